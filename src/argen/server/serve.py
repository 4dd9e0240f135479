"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT: new requests get 503
at once, uvicorn stops accepting connections and waits for the open ones, the scheduler finishes
what is in flight, and the process exits 0 (a second SIGINT forces it).

Connections are guarded (`connections.py`: idle and request timeouts, a connection cap), h11
buffers at most `MAX_HEAD_BYTES` of an incomplete request head, and the noisy loggers are
rate-limited (`logs.py`)."""

from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn

from argen.api import Generator
from argen.server.app import create_app
from argen.server.connections import connection_cap, guarded_protocol
from argen.server.logs import rate_limit_logs
from argen.server.scheduler import Scheduler

MAX_HEAD_BYTES = 16 * 1024  # a request head still incomplete past this gets 400 (h11's default, made explicit)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler: Scheduler) -> None:
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame) -> None:
        self.scheduler.draining = True  # a plain flag: safe to set from a signal handler
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own version re-raises the signal once shut down, which would turn a clean,
        # drained exit into death by SIGTERM; this one only installs and restores the handlers.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def make_server(
    gen: Generator,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    max_connections: int = 512,
    timeout_keep_alive: float = 5.0,
    request_timeout: float = 30.0,
    **app_options,
) -> DrainingServer:
    """A uvicorn server for `create_app(gen, **app_options)`: at most `max_connections` open
    connections (fewer if the open-files limit says so), idle ones closed after
    `timeout_keep_alive` seconds, each request given `request_timeout` seconds to arrive."""
    app = create_app(gen, **app_options)
    protocol = guarded_protocol(request_timeout, connection_cap(max_connections))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        http=protocol,
        # uvicorn types it int; a float works (it is a delay given to asyncio's call_later)
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    rate_limit_logs()  # after uvicorn.Config, which configures the logging
    return DrainingServer(config, app.state.scheduler)


def serve(gen: Generator, host: str = "127.0.0.1", port: int = 8000, **options) -> int:
    make_server(gen, host, port, **options).run()
    return 0
