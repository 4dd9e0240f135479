"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT: new requests get 503
at once, uvicorn stops accepting connections and waits for the open ones, the scheduler finishes
what is in flight, and the process exits 0 (a second SIGINT forces it)."""

from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn

from argen.api import Generator
from argen.server.app import create_app
from argen.server.scheduler import Scheduler


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


def make_server(gen: Generator, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 32,
                max_queue: int = 128, max_tokens_limit: int | None = None, log_level: str = "info",
                model_id: str | None = None) -> DrainingServer:  # fmt: skip
    app = create_app(gen, model_id=model_id, max_batch=max_batch, max_queue=max_queue,
                     max_tokens_limit=max_tokens_limit)  # fmt: skip
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    return DrainingServer(config, app.state.scheduler)


def serve(gen: Generator, host: str = "127.0.0.1", port: int = 8000, **options) -> int:
    make_server(gen, host, port, **options).run()
    return 0
