"""The cache: manifest, two storage backends, a background shard writer, and the reader."""

from geocache.cache.backends import BACKENDS, get_backend
from geocache.cache.manifest import FORMAT_VERSION, Manifest, ShardInfo
from geocache.cache.reader import CacheError, CacheReader, collate_cache_rows, open_cache
from geocache.cache.writer import CacheWriteError, ShardWriter

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "CacheError",
    "CacheReader",
    "CacheWriteError",
    "Manifest",
    "ShardInfo",
    "ShardWriter",
    "collate_cache_rows",
    "get_backend",
    "open_cache",
]
