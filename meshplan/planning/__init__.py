"""The planning layer, above the axes: every axis's plan resolved once per ``prepare`` and built through one path.

* :mod:`.resolve`: the explicit plan of each axis, else the plan providers along the model's MRO, each provider
  called at most once for all axes (``tp``, ``ep``, and ``pp`` passed through untouched).
* :mod:`.build`: :func:`~.build.build_plan`, resolved -> matched -> fitted, the one path for every axis (used by the
  dispatcher and by the NeMo-compatible surface).
* :mod:`.axes`: which axes a ``prepare`` uses, and the refusal of those a strategy does not declare.
* :mod:`.dispatch`: ``prepare`` / :class:`~.dispatch.Prepared` / ``get_report`` behind ``meshplan.parallelize``.
* :mod:`.legacy`: the adapter that runs pre-contract strategies for one release.
"""
