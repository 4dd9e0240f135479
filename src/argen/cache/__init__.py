"""KV memory: the cache contract (kv.py), paged blocks and the prefix cache (paged.py), presses."""

from argen.cache.kv import KVCache, PagedKV

__all__ = ["KVCache", "PagedKV"]
