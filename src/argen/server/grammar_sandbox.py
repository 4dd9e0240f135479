"""Client grammars compiled first in child processes, under a deadline and a memory cap, a few at a time.

Compiling a grammar (a response_format, or a forced tool call's schema) can cost time and memory
exponential in its size: llguidance decides whether an intersection of regexes is empty, and none
of its limits bounds that (an allOf of 200 patterns ran for 20 minutes and grew to 10 GB). So the
server never compiles a client's grammar first in the thread pool that every request's preparation
shares (six such compiles stalled every client), nor on the scheduler's thread. Each grammar is
compiled by a child process (`argen/grammar_check.py` run as a script: llguidance only, at a lower
CPU priority than the server's threads), killed at the deadline, its address space capped; only a grammar the child compiled within both is compiled
again here, in this sandbox's own threads (at most `workers` at once, never the shared pool), and
each of its sequences decodes with a copy of that matcher. A grammar that waits for a free child
longer than GRAMMAR_WAIT_SECONDS gets 429, so a hostile grammar is answered within the wait and the
deadline together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from argen import grammar_check
from argen.constraints import GrammarCompiler
from argen.engine import Request
from argen.errors import InvalidRequestError
from argen.server.errors import APIError, bad_request

GRAMMAR_SECONDS = 2.0  # a child's compile at most
GRAMMAR_WAIT_SECONDS = 1.0  # a grammar's wait for a free child at most (then 429)
GRAMMAR_MEMORY_MB = 1024  # address space a child may map for a compile, beyond its own
GRAMMAR_WORKERS = 2  # children, so grammars compiled at once
STARTUP_SECONDS = 60.0  # a new child reads the tokenizer (~0.5 s; much more on a loaded machine)
SCRIPT = Path(grammar_check.__file__)


class _Killed(Exception):
    """The child is gone: it ran past its deadline (killed), or died (its memory cap), while
    compiling (`compiling`) or before it took the grammar (a failed start)."""

    def __init__(self, reason: str, compiling: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.compiling = reason, compiling


class _Child:
    """One compiling child process: started at once, its setup sent; ready when it says so."""

    def __init__(self, setup: bytes) -> None:
        # -I: no user site, no PYTHONPATH, no current directory: the script needs llguidance only.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.ready = False
        # The setup (the tokenizer, MBs) fills the pipe until the child starts reading: sent from a
        # thread of its own, so that replacing a killed child never holds up an answer.
        self._setup = threading.Thread(target=self._send_quietly, args=(setup,), daemon=True)
        self._setup.start()

    def _send_quietly(self, frame: bytes) -> None:
        with contextlib.suppress(_Killed):
            self._send(frame)

    def _send(self, frame: bytes) -> None:
        assert self.proc.stdin is not None  # Popen(stdin=PIPE)
        try:
            self.proc.stdin.write(frame)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.kill()
            raise _Killed("gone") from None

    def _receive(self, deadline: float) -> dict:
        assert self.proc.stdout is not None  # Popen(stdout=PIPE)
        try:
            fd = self.proc.stdout.fileno()
        except ValueError:  # closed: the child is gone (its setup failed)
            raise _Killed("gone") from None
        head = self._read(fd, 4, deadline)
        (size,) = struct.unpack(">I", head)
        return json.loads(self._read(fd, size, deadline).decode())

    def _read(self, fd: int, n: int, deadline: float) -> bytes:
        data = b""
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise _Killed("deadline")
            chunk = os.read(fd, n - len(data))
            if not chunk:
                self.kill()
                raise _Killed("died")
            data += chunk
        return data

    def check(self, grammar: str, seconds: float) -> str | None:
        """llguidance's error for `grammar` (None: it compiles), or _Killed."""
        if not self.ready:
            deadline = time.monotonic() + STARTUP_SECONDS
            self._setup.join(STARTUP_SECONDS)
            self._receive(deadline)
            self.ready = True
        self._send(_frame({"grammar": grammar}))
        try:
            return self._receive(time.monotonic() + seconds)["error"]
        except _Killed as exc:
            raise _Killed(exc.reason, compiling=True) from None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            assert stream is not None  # Popen(stdin=PIPE, stdout=PIPE)
            with contextlib.suppress(OSError):
                stream.close()


def _frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


class GrammarSandbox:
    """Compiles each request's grammar (sets `Request.matcher`) within `seconds` and `memory_mb`,
    at most `workers` at once, or answers the client 400 (the grammar) or 429 (too many at once)."""

    def __init__(
        self,
        compiler: GrammarCompiler,
        *,
        workers: int = GRAMMAR_WORKERS,
        seconds: float = GRAMMAR_SECONDS,
        memory_mb: int = GRAMMAR_MEMORY_MB,
    ) -> None:
        if workers < 1 or seconds <= 0 or memory_mb < 1:
            raise ValueError("grammar workers, seconds and memory must be positive")
        self.compiler, self.workers, self.seconds, self.memory_mb = compiler, workers, seconds, memory_mb
        self._executor: ThreadPoolExecutor | None = None
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._setup: bytes | None = None

    def start(self) -> None:
        """Start the children (in the sandbox's own threads: a child is killed when the thread that
        started it ends, so no child outlives the server)."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="argen-grammar")
        for _ in range(self.workers):
            self._executor.submit(self._spawn)

    def close(self) -> None:
        if self._executor is None:
            return
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break

    def pids(self) -> list[int]:
        """The children waiting for a grammar (those compiling now are not listed)."""
        children = []
        while True:
            try:
                children.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for child in children:
            self._idle.put(child)
        return [c.proc.pid for c in children if c.alive]

    async def compile(self, request: Request) -> None:
        if request.grammar is None or request.matcher is not None:
            return
        self.start()
        queued = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            request.matcher = await loop.run_in_executor(self._executor, self._compile, request.grammar, queued)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), "response_format", code="invalid_grammar") from exc

    # -- in the sandbox's threads ----------------------------------------------------------------
    def _spawn(self) -> None:
        if self._setup is None:
            self._setup = _frame(
                {
                    "tokenizer": self.compiler.tokenizer_json(),
                    "vocab_size": self.compiler.vocab_size,
                    "eos": self.compiler.ll_eos,
                    "limits": grammar_check.LIMITS,
                    "memory_bytes": self.memory_mb << 20,
                }
            )
        self._idle.put(_Child(self._setup))

    def _compile(self, grammar: str, queued: float):
        waited = time.monotonic() - queued
        if waited > GRAMMAR_WAIT_SECONDS:
            raise APIError(
                429,
                f"the server is compiling as many grammars as it can ({self.workers} at once); this "
                f"one waited {waited:.1f} s. Retry shortly",
                code="grammar_busy",
                headers={"Retry-After": "1"},
            )
        for _ in range(2):  # a child that failed before it took the grammar is replaced, once
            child = self._idle.get()
            try:
                error = child.check(grammar, self.seconds)
            except _Killed as exc:
                self._spawn()  # its replacement starts now, for the next grammar
                if exc.compiling:
                    raise InvalidRequestError(self._too_costly(exc.reason)) from None
                continue
            self._idle.put(child)
            if error is not None:
                raise InvalidRequestError(f"response_format: the grammar is not valid: {grammar_check.describe(error)}")
            return self.compiler.compile(grammar)  # the child showed it is bounded: now for the request
        raise APIError(503, "the grammar compiler could not start; retry later", code="grammar_unavailable")

    def _too_costly(self, reason: str) -> str:
        cost = f"longer than {self.seconds:g} s" if reason == "deadline" else f"more than {self.memory_mb} MB"
        return (
            f"response_format: the grammar takes {cost} to compile; simplify it (fewer alternatives, nested "
            "repetitions and combined patterns)"
        )
