"""Every error meshplan raises on purpose, all under :class:`MeshplanError`.

>>> try:
...     meshplan.parallelize(model, mesh, strategy="fsdp2", ep_size=3)
... except meshplan.errors.ExpertParallelError as exc:
...     ...

The same classes are importable from ``meshplan`` itself. The NeMo AutoModel drop-in
(``meshplan.parallelizer``) raises subclasses of these that also derive from ``AssertionError`` where
the reference asserted: :mod:`meshplan.compat.errors`.
"""

from .core.errors import *  # noqa: F403 - this module is the public face of core.errors
from .core.errors import __all__ as __all__
