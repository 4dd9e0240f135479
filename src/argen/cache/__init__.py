from argen.cache.kv import KVCache

__all__ = ["KVCache"]
