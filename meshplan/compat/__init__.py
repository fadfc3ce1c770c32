"""Compatibility surfaces for code written against other libraries (NeMo AutoModel's parallelizer)."""
