"""Moved to ``fastddpm.ops.reference``.  This re-export stays only while ``fastddpm/sampling.py``
(changed on another branch) still imports ``fastddpm.reference``; delete it once that import reads
``from .ops import reference``."""
from .ops.reference import *  # noqa: F401,F403
from .ops.reference import __all__  # noqa: F401
