"""The conformance harness: every transformers model type with a TP (or EP) plan, built from a tiny config, run
once on one process and once sharded on gloo ranks, logits and gradients compared (:mod:`.check` for TP=2,
:mod:`.expert_check` for EP=2, :mod:`.default_size` for the sharded share at the default config size).

``bench/conformance.py`` (the full sweep, docs/conformance.md) and the tests (the CI subset) both use it; it lives in
the package so that spawned ranks import the checks by name with no path set-up, and plugin authors can run the same
check on their plans. ``import meshplan`` does not import it.
"""
