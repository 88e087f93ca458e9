"""The HDF5 teacher cache: per sample (keyed by its content SHA-256), the teacher's sparse distribution
at each trainable position. The only package of distill that imports h5py; ``docs/cache.md`` has the
schema, the encoding (``codec``), the crash-safety argument and measured sizes.

spec -> segment (writing, commit by rename) -> lock (one writer, readers keep their segments) -> reader
(index, checked reads) -> compaction -> store (open, sync, prune) -> stats, mixture, verify (what the
``cache`` command, ``distill.commands.cache``, runs).
"""

from distill.cache.lock import CacheLockedError, WriterLock
from distill.cache.reader import CacheReader
from distill.cache.segment import CacheCorruptError, CacheWriter
from distill.cache.spec import CacheSpec, StaleCacheError
from distill.cache.stats import cache_stats
from distill.cache.store import Freed, SyncPlan, TeacherCache, open_cache

__all__ = [
    "CacheCorruptError",
    "CacheLockedError",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "Freed",
    "StaleCacheError",
    "SyncPlan",
    "TeacherCache",
    "WriterLock",
    "cache_stats",
    "open_cache",
]
