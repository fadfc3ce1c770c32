"""``meshplan.parallelizer``: NeMo AutoModel's parallelizer surface.

This name *is* :mod:`meshplan.compat.nemo_parallelizer` (the same module object), so patching a global
here (``monkeypatch.setattr("meshplan.parallelizer.fully_shard", ...)``) changes what its functions call.
"""

import sys

from .compat import nemo_parallelizer

sys.modules[__name__] = nemo_parallelizer
