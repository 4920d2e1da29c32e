"""cachekd: distil language models from an offline teacher-logit cache.

The teacher runs once (``cachekd precompute``) and writes its top-k or full logits into a sharded Zarr cache
aligned with fixed token windows; any number of students are then trained from that cache (``cachekd distill``)
without ever loading the teacher again.
"""

__version__ = "0.1.0"

from cachekd.errors import CachekdError

__all__ = ["CachekdError", "__version__"]
