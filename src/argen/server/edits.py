"""Prompt edits in the server (`edit` on /v1/completions, PIE: cache/pie.py): an edit names a prompt
this server served, so the server remembers which prompts it served, as digests of their token ids
(16 bytes each, at most MAX_SERVED_PROMPTS, the least recently served forgotten first). A prompt it
never served (or forgot) is refused with a 400; one it served whose blocks the prefix cache has
evicted since runs as a full prefill, and the response says so. Nothing a client sends names a file
or grows the memory: the edit's size is bounded (protocol.py) and the edited prompt is checked as any
prompt is."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

MAX_SERVED_PROMPTS = 4096


def digest(ids: list[int]) -> bytes:
    return hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=16).digest()


class ServedPrompts:
    """The prompts served lately, by digest (requests are built in worker threads: a lock)."""

    def __init__(self, limit: int = MAX_SERVED_PROMPTS) -> None:
        self.limit = limit
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, ids: list[int]) -> None:
        key = digest(ids)
        with self._lock:
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)

    def __contains__(self, ids: list[int]) -> bool:
        key = digest(ids)
        with self._lock:
            return key in self._seen
