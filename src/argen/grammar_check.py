"""Compiling one grammar and checking it, with llguidance and the standard library only.

Used in two places: in process by `constraints.GrammarCompiler` (the Python API and `argen batch`,
which trust their caller), and as the script of the server's grammar sandbox
(`server/grammar_sandbox.py`), a child process under a deadline and a memory cap, since compiling a
grammar can cost time and memory exponential in its size (llguidance decides whether an
intersection of regexes is empty; no llguidance limit bounds that). Run as a script it imports
neither torch nor argen, so a fresh child is ready in a fraction of a second.

The child's protocol, over stdin and stdout, each message a 4-byte big-endian length and a UTF-8
JSON body: the parent sends a setup ({"tokenizer": <tokenizers JSON>, "vocab_size", "eos",
"limits": LLParserLimits' keywords, "memory_bytes"}), the child answers {"ready": true}; then for
each grammar the parent sends {"grammar": ...} and the child answers {"error": message or null}.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from typing import BinaryIO

# llguidance's work bounds for one grammar (its defaults, made explicit: a server takes grammars from
# clients it does not trust). verbose_errors=False keeps the parser's state out of its messages.
LIMITS = {
    "max_items_in_row": 2000,
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "step_max_items": 50_000,
    "max_grammar_size": 500_000,
    "max_lexer_states": 250_000,
    "verbose_errors": False,
}
_QUOTED = re.compile(r'"[^"\n]*"|\'[^\'\n]*\'|/[^/\n]*/|`[^`\n]*`')


def first_error(matcher, eos: list[int] | None = None) -> str | None:
    """The error of a freshly built llguidance matcher, or None. The first mask is computed too, and
    the one after the first token it allows (EOS aside), then rolled back: some limits (a row of more
    than `max_items_in_row` Earley items: a 9,000-way alternation) trip only there, and they should
    fail the request before it is queued. (Limits on one step's work can still trip later on, on
    text the model writes: the request then fails with an error that names the grammar.)"""
    if matcher.is_error():
        return matcher.get_error()
    bits = matcher.compute_bitmask()
    if matcher.is_error():
        return matcher.get_error()
    token = _first_allowed(bits, set(eos or ()))
    if token is not None and not matcher.is_stopped():
        if matcher.consume_token(token):
            matcher.compute_bitmask()
        if matcher.is_error():
            return matcher.get_error()
        matcher.rollback(1)
    return None


def _first_allowed(bits: bytes, skip: set[int]) -> int | None:
    """The lowest token id set in an llguidance bitmask (little-endian bits), `skip` aside."""
    for j, byte in enumerate(bits):
        while byte:
            low = byte & -byte
            token = 8 * j + low.bit_length() - 1
            if token not in skip:
                return token
            byte ^= low
    return None


def describe(error: str) -> str:
    """An llguidance error for a client: its first line, with whatever it quotes of the grammar
    (quoted or /slashed/ fragments, a regex's S-expression) left out, plus a regex parser's
    diagnosis ("error: unclosed group"), at most 200 characters. The other lines quote the grammar:
    clients are never sent their grammar back (SECURITY.md)."""
    lines = error.strip().splitlines() or ["rejected by the grammar compiler"]
    line = lines[0].split("  (", 1)[0]  # "Unable to determine if regex is empty:  (And (SearchRegex /.*a0.*/) ...)"
    line = _QUOTED.sub("…", line).rstrip(" :")
    diagnosis = next((x.strip() for x in lines[1:] if x.startswith("error: ")), None)
    return (line if diagnosis is None else f"{line} ({_QUOTED.sub('…', diagnosis)})")[:200]


def _read(stream: BinaryIO) -> dict | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    return json.loads(stream.read(size).decode())


def _write(stream: BinaryIO, message: dict) -> None:
    body = json.dumps(message).encode()
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the parent dies, even mid-compile (no orphans)."""
    try:
        import ctypes
        import os
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _cap_memory(extra_bytes: int) -> None:
    """Address space: what the process maps now plus `extra_bytes`. A compile past it fails its
    allocation, and llguidance (Rust) aborts the process: the parent sees the child gone."""
    import resource

    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


NICENESS = 5  # a compile yields the CPU to the server's threads (a quarter of a core against a busy one)


def main() -> None:
    _die_with_parent()
    import os

    os.nice(NICENESS)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    setup = _read(stdin)
    if setup is None:
        return
    import llguidance

    tokenizer = llguidance.LLTokenizer(setup["tokenizer"], n_vocab=setup["vocab_size"], eos_token=setup["eos"])
    limits = llguidance.LLParserLimits(**setup["limits"])
    _cap_memory(setup["memory_bytes"])
    _write(stdout, {"ready": True})
    while (message := _read(stdin)) is not None:
        matcher = llguidance.LLMatcher(tokenizer, message["grammar"], log_level=0, limits=limits)
        eos = setup["eos"]
        _write(stdout, {"error": first_error(matcher, eos if isinstance(eos, list) else [eos])})


if __name__ == "__main__":
    main()
