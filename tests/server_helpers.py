"""Running the argen server in tests: uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager

from argen.server.serve import make_server


@contextmanager
def running_server(gen, **options):
    """Yields (base URL, server); the server stops (draining) when the block ends."""
    server = make_server(gen, "127.0.0.1", 0, log_level="warning", **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = (
        rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? ([0-9.e+-]+)$" if want else rf"^{re.escape(name)} (\S+)$"
    )
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0
