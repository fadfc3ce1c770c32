"""Mixture-of-experts support: finding fused expert modules, splitting experts by tensor parallelism, even FSDP2
shards of expert parameters, and expert parallelism (token dispatch, the expert-parallel style)."""
