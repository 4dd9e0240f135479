"""Connection guards for uvicorn's HTTP/1.1 protocol (h11): a deadline for each request to arrive,
idle connections closed from the moment they open, and a cap on open connections.

uvicorn closes a keep-alive connection that stays silent `timeout_keep_alive` seconds after a
response, but has no deadline for a request to arrive: a client that opens a connection and sends
nothing, or trickles a header a byte at a time, holds a file descriptor forever (1,100 of them
starved a server of descriptors). Its `limit_concurrency` counts idle connections as load and
answers everyone 503 while they sit there, so a few hundred silent sockets would still lock out
every real client. This protocol subclass adds, per connection:

- the keep-alive timer from the start, not only after a first response: silence is idle time;
- a request deadline (`request_timeout`): from the connection's start, or the end of its previous
  response, the request's head and body must be in within that many seconds, however slowly the
  bytes come (a trickle resets uvicorn's keep-alive timer, not this one);
- a cap (`max_connections`): a connection over the cap closes the open connection that has been
  idle longest (no request in progress), as nginx does with keep-alive connections when it runs
  out; if every connection is busy, the newcomer gets a 503 and is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("argen.server")
DESCRIPTORS_SPARE = 128  # file descriptors kept for everything but client connections (models, logs, ...)


class GuardedH11Protocol(H11Protocol):
    request_timeout: float = 30.0
    max_connections: int = 512

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm_deadline()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and cycle is not self._waiting_after and not cycle.more_body:
            self._disarm_deadline()  # the request is in: the app takes its time to answer

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_deadline()

    # -- the request deadline ------------------------------------------------------------------
    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._idle_since = self.loop.time()
        self._waiting_after = self.cycle  # the request that ended (None: none yet)
        self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _disarm_deadline(self) -> None:
        deadline = getattr(self, "_deadline", None)  # None before connection_made
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection whose request took over %s s to arrive", self.request_timeout)
            self.transport.close()

    # -- the connection cap --------------------------------------------------------------------
    def _idle(self) -> bool:
        """No request in progress (a request still arriving counts as idle: it has no claim yet)."""
        busy = self.cycle is not None and not self.cycle.response_complete
        return not busy and not self.transport.is_closing()

    def _make_room(self) -> None:
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol) and c._idle()]
        if idle:
            oldest = min(idle, key=lambda c: c._idle_since)
            oldest.transport.close()
            return
        log.warning("%d connections open, all busy: refused a new one (--max-connections)", len(self.connections) - 1)
        body = json.dumps(
            {
                "error": {
                    "message": "the server has too many open connections; retry later",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "too_many_connections",
                }
            }
        )
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\nretry-after: 1\r\n\r\n"
        )
        self.transport.write((head + body).encode())
        self.transport.close()


def guarded_protocol(request_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class for one server (its settings are class attributes: uvicorn makes the
    instances)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"request_timeout": request_timeout, "max_connections": max_connections},
    )


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to what the process's file-descriptor limit leaves for clients."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted <= soft - DESCRIPTORS_SPARE:
        return wanted
    cap = max(1, soft - DESCRIPTORS_SPARE)
    log.warning("--max-connections %d lowered to %d: the open-files limit (ulimit -n) is %d", wanted, cap, soft)
    return cap
