"""The HDF5 teacher cache: per sample (keyed by its content SHA-256), the teacher's sparse distribution
at each trainable position. The only package of distill that imports h5py; ``docs/cache.md`` has the
schema, the encoding (``codec``), the crash-safety argument and measured sizes.

spec -> segment (writing, commit by rename) -> reader (index, reads) -> compaction -> store (open, sync)
-> stats and the ``cache`` command (cli).
"""

from distill.cache.reader import CacheReader
from distill.cache.segment import CacheWriter
from distill.cache.spec import CacheSpec, StaleCacheError
from distill.cache.stats import cache_stats
from distill.cache.store import SyncPlan, TeacherCache, open_cache

__all__ = [
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "StaleCacheError",
    "SyncPlan",
    "TeacherCache",
    "cache_stats",
    "open_cache",
]
