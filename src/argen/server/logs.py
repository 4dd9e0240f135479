"""Rate-limited logging: a message that repeats (the event loop's "socket.accept() out of system
resource" when file descriptors run out, uvicorn's "Invalid HTTP request received." under a flood
of junk) is logged a few times per interval; the next line that gets through says how many were
dropped. Without it one misbehaving client can fill the disk with the same traceback."""

from __future__ import annotations

import logging
import time

LOGGERS = ("asyncio", "uvicorn.error", "argen.server")


class RateLimit(logging.Filter):
    def __init__(self, per_interval: int = 5, interval: float = 60.0) -> None:
        super().__init__()
        self.per_interval, self.interval = per_interval, interval
        self._windows: dict[tuple, list] = {}  # (logger, level, message template) -> [start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0])  # asyncio's 2nd line varies
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            dropped = window[2] if window else 0
            window = self._windows[key] = [now, 0, 0]
            if len(self._windows) > 1000:  # bounded memory, whatever the variety of messages
                self._windows = {key: window}
            if dropped:
                record.msg = f"{record.msg} [{dropped} more like this in the last {self.interval:g} s not logged]"
        if window[1] >= self.per_interval:
            window[2] += 1
            return False
        window[1] += 1
        return True


def rate_limit_logs(per_interval: int = 5, interval: float = 60.0) -> None:
    """Install one RateLimit filter on each of the server's noisy loggers (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit(per_interval, interval))
