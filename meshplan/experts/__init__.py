"""Mixture-of-experts support: expert parallelism (token dispatch, the expert-parallel style)."""
