"""Continuous batching: one worker thread owns the model and loops over the engine's Scheduler.

This module keeps the thread, the queues and the metrics; who runs is the engine's Scheduler's
decision (engine/scheduler.py), the same as `generate` and `argen batch` make. Each iteration it
drops cancelled requests (their KV blocks go with them), admits waiting ones while there is room
(a slot under --max-batch for each of a request's n samples, and KV memory for its worst case),
and runs one round of the decode loop: every sequence's feeds in one packed pass, plus prefill chunks
under the round's token budget (shortest prompt first), a long prompt's chunks paced so that the
others run at least 1/prefill_slowdown as fast as alone (engine/pacing.py). Every token event is handed to its request's
asyncio queue with `call_soon_threadsafe`, so the HTTP side never blocks on the model and the model
never waits for a slow client. Requests join and leave between steps (Orca-style iteration-level
scheduling: the temporal fusion of decode steps across in-flight requests). Image requests
(/v1/images/generations: engine/images.py) take the same path: the same line, the same --max-batch
(an image is a row), one pass of each image batch a round beside the text rows, and compatible
requests admitted together decode as one batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from argen.engine import DecodeBatch, Engine, Event, Failure, ImageRequest, ImagesDone, Request, Result
from argen.engine.pacing import PREFILL_SLOWDOWN, PrefillPacer
from argen.engine.scheduler import PREFILL_CHUNK, STEP_TOKENS, Waiting
from argen.engine.scheduler import Scheduler as Admission
from argen.errors import ArgenError
from argen.server.memory import TRIM_AFTER_IDLE_S, release_free_memory
from argen.server.metrics import Metrics

log = logging.getLogger("argen.server")


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass(eq=False)
class Ticket:
    """One request's passage through the scheduler; its queue receives Events, then a Result per
    sample (n in all), or an exception; for an image request, its ImagesDone or an exception."""

    id: int
    request: Request | ImageRequest
    loop: asyncio.AbstractEventLoop
    endpoint: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False
    done: bool = False
    left: int = 1  # samples still decoding (the request's n, less the Results sent)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        max_batch: int = 32,
        max_queue: int = 128,
        prefill_chunk: int | None = PREFILL_CHUNK,
        step_tokens: int | None = STEP_TOKENS,
        prefix_caching: bool = True,
        kv_blocks: int | None = None,
        prefill_slowdown: float | None = PREFILL_SLOWDOWN,
    ) -> None:
        """`prefill_chunk` / `step_tokens` None: whole prompts, no per-round limit (no chunked prefill);
        `kv_blocks`: KV blocks the running requests' worst cases may add up to (None: the whole pool);
        `prefill_slowdown`: long prefill chunks wait while they would slow the others more than this
        (engine/pacing.py; None: they never wait)."""
        bad_blocks = kv_blocks is not None and kv_blocks < 1
        if max_batch < 1 or max_queue < 0 or (prefill_chunk or 1) < 1 or (step_tokens or 1) < 1 or bad_blocks:
            raise ValueError("max_batch, prefill_chunk, step_tokens and kv_blocks must be >= 1 and max_queue >= 0")
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.step_tokens, self.prefix_caching = prefill_chunk, step_tokens, prefix_caching
        self.kv_blocks = kv_blocks
        self.pacer = PrefillPacer(prefill_slowdown) if prefill_slowdown else None
        self.peak_sequences = 0
        self.admission = Admission(self._new_batch(), max_sequences=self.max_batch)
        self._running: dict[int, Ticket] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.step_seconds = 0.0  # moving average, for Retry-After

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(
            self.engine,
            token_budget=self.step_tokens,
            prefill_chunk=self.prefill_chunk,
            prefix_caching=self.prefix_caching,
            kv_blocks=self.kv_blocks,
            pacer=self.pacer,
        )

    @property
    def batch(self) -> DecodeBatch:
        return self.admission.batch

    @property
    def _waiting(self) -> deque[Waiting]:
        return self.admission.waiting  # the tickets in line (each Waiting's owner)

    # -- called from the event loop ------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self.batch.reset_kv_peak()  # the peaks are this server's
                limit = self.batch.kv_blocks_limit()
                if limit is not None:
                    self.metrics.kv_blocks_limit.set(limit)
                self._thread = threading.Thread(target=self._loop, name="argen-scheduler", daemon=True)
                self._thread.start()

    def submit(self, request: Request, endpoint: str) -> Ticket:
        return self.submit_all([request], endpoint)[0]

    def submit_all(self, requests: list[Request] | list[ImageRequest], endpoint: str) -> list[Ticket]:
        """Queue the requests of one HTTP request (a list of prompts: one each) together, all or none
        (QueueFull); they wait in line next to each other, so they are admitted and batched together.
        Their tickets share one queue."""
        self.start()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        with self._cond:
            if self.draining:
                raise Draining()
            # At most max_batch requests run (each takes at least one of the max_batch sequence slots).
            if len(self._running) + len(self._waiting) + len(requests) > self.max_batch + self.max_queue:
                raise QueueFull()  # every slot is taken and max_queue requests already wait for one
            # An image request ends with one ImagesDone whatever its n (its images): left=1.
            tickets = [
                Ticket(next(self._ids), r, loop, endpoint, queue, left=1 if isinstance(r, ImageRequest) else r.n)
                for r in requests
            ]
            for ticket in tickets:
                self.admission.add(Waiting(ticket.id, ticket.request, ticket))
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()
        return tickets

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: the sequence leaves the batch at the next step."""
        if not ticket.done:
            ticket.cancelled = True
            with self._cond:
                self._cond.notify()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: a rough guess from the step time and the queue."""
        per_request = max(self.step_seconds, 0.01) * 64
        return max(1, min(60, round(per_request * (len(self._waiting) + 1) / self.max_batch)))

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the ones in flight, then end the worker."""
        with self._cond:
            self.draining = self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def n_running(self) -> int:
        return len(self._running)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    # -- the worker thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        trimmed = True  # nothing to give back before the first request
        while True:
            with self._cond:
                while self._idle() and not self._stop:
                    if not self._cond.wait(None if trimmed else TRIM_AFTER_IDLE_S):
                        break  # idle for a moment since the last request: trim, below
                if self._idle():
                    if self._stop:
                        return
                    admit = None
                else:
                    admit = self._admit()
            if admit is None:  # outside the lock: a request may arrive meanwhile
                release_free_memory()
                trimmed = True
                continue
            trimmed = False
            try:
                self._iteration(admit)
            except Exception:  # a bug in the loop itself: fail what is running, keep serving
                log.exception("scheduler iteration failed")
                for ticket in list(self._running.values()):
                    self._finish(ticket, RuntimeError("internal error in the scheduler"), "error")
                self.admission.batch = self._new_batch()  # the requests in line keep their places
            self._rest()

    def _idle(self) -> bool:
        return not self._waiting and not self._running

    def _admit(self) -> list[Ticket]:
        # The engine's one admission; the server's entries carry their Ticket.
        admit = [cast(Ticket, entry.owner) for entry in self.admission.take()]
        self.metrics.waiting.set(len(self._waiting))
        return admit

    def _rest(self) -> None:
        """A long prompt held back for a moment with nothing else to run (engine/pacing.py): wait until
        it may run, or for a new request, rather than spin."""
        until = self.batch.held_until
        if until is not None:
            with self._cond:
                if not self._waiting and not self._stop:
                    self._cond.wait(max(0.0, until - time.perf_counter()))

    def _iteration(self, admit: list[Ticket]) -> None:
        self._drop_cancelled()
        for admitted in admit:
            if admitted.cancelled:
                self._count(admitted, "cancelled")
                continue
            self.metrics.queue_seconds.observe(time.perf_counter() - admitted.arrived)
            self._running[admitted.id] = admitted
            try:
                self.admission.admit(Waiting(admitted.id, admitted.request))
            except Exception as exc:
                _log_failure(admitted, exc, "at admission")
                self._finish(admitted, exc, "error")
                continue
            if isinstance(admitted.request, Request):
                self.metrics.prompt_tokens.inc(len(admitted.request.prompt_ids))
        self.metrics.running.set(len(self._running))
        if not len(self.batch):
            self._count_sequences()  # the batch emptied (cancelled, failed): the gauges say so too
            self._count_kv()
            return
        t0 = time.perf_counter()
        self.metrics.batch_size.observe(len(self.batch))
        self._count_sequences()
        items = self.admission.step()
        self._count_sequences()
        self._count_kv()
        elapsed = time.perf_counter() - t0
        self.metrics.step_seconds.observe(elapsed)
        self.step_seconds = 0.9 * self.step_seconds + 0.1 * elapsed if self.step_seconds else elapsed
        for item in items:
            ticket = self._running.get(item.index)
            if ticket is None:
                continue
            if isinstance(item, Event):
                if item.token_ids:
                    self.metrics.generation_tokens.inc(len(item.token_ids))
                    if ticket.first_token is None:
                        ticket.first_token = time.perf_counter()
                        self.metrics.ttft_seconds.observe(ticket.first_token - ticket.arrived)
                if item.token_ids or item.text or item.finish_reason:  # a beam search step emits nothing
                    self._send(ticket, item)
            elif isinstance(item, Result):
                self.metrics.cached_prompt_tokens.inc(item.stats.cached_prompt_tokens)
                ticket.left -= 1
                if ticket.left > 0:  # one of n samples: the others go on
                    self._send(ticket, item)
                    continue
                self.metrics.latency_seconds.observe(time.perf_counter() - ticket.arrived)
                self._finish(ticket, item, item.finish_reason)
            elif isinstance(item, ImagesDone):
                self.metrics.image_batch_rows.observe(item.batch_rows)
                self.metrics.latency_seconds.observe(time.perf_counter() - ticket.arrived)
                self._finish(ticket, item, "done")
            elif isinstance(item, Failure):
                _log_failure(ticket, item.error, "while decoding")
                self._finish(ticket, item.error, "error")
        self.metrics.running.set(len(self._running))

    def _count_sequences(self) -> None:
        """Sequences running now, and the most at once (before a round: those just admitted; after:
        a request's n samples, forked during the round)."""
        self.peak_sequences = max(self.peak_sequences, len(self.batch))
        self.metrics.sequences.set(len(self.batch))
        self.metrics.sequences_peak.set(self.peak_sequences)

    def _count_kv(self) -> None:
        """The KV memory the running sequences hold now (and the most held at once)."""
        self.metrics.kv_bytes_held.set(self.batch.kv_bytes_held())
        self.metrics.kv_bytes_used.set(self.batch.kv_bytes_used())
        held, peak = self.batch.kv_blocks_held()
        self.metrics.kv_blocks_held.set(held)
        self.metrics.kv_blocks_held_peak.set(peak)

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave the batch, every one of their samples with them."""
        gone = [t for t in self._running.values() if t.cancelled]
        if not gone:
            return
        ids = {t.id for t in gone}
        self.batch.remove([s for s in self.batch.sequences if s.index in ids])
        self.batch.drop_images(ids)
        for ticket in gone:
            del self._running[ticket.id]
            self._count(ticket, "cancelled")

    def _finish(self, ticket: Ticket, item: Result | ImagesDone | Exception, outcome: str) -> None:
        self._running.pop(ticket.id, None)
        if isinstance(item, Exception):
            self.batch.remove([s for s in self.batch.sequences if s.index == ticket.id])
        self._send(ticket, item)
        ticket.done = True
        self._count(ticket, outcome)

    def _count(self, ticket: Ticket, outcome: str) -> None:
        self.metrics.requests.labels(ticket.endpoint, outcome).inc()

    @staticmethod
    def _send(ticket: Ticket, item) -> None:
        try:
            ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            ticket.cancelled = True


def _log_failure(ticket: Ticket, exc: Exception, when: str) -> None:
    """One line for a request the client caused to fail (its 400 says why), a traceback for a bug."""
    if isinstance(exc, ArgenError):
        log.warning("request %s rejected %s: %s", ticket.id, when, exc)
    else:
        log.error("request %s failed %s: %r", ticket.id, when, exc, exc_info=exc)
