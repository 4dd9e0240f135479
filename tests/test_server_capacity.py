"""`--kv-blocks`: the KV memory the server's running requests may hold, and the gauges that show how
many sequences it held at once (what `python -m benchmarks serving --case press-capacity` reads)."""

from __future__ import annotations

import threading

import httpx
import pytest
from server_helpers import metric, running_server

from argen.engine import DecodeBatch, Request
from argen.sampling import SamplingParams
from argen.strategies import make_strategy

PROMPT = "The river runs past the old mill and the towns along it. " * 4  # ~230 byte tokens
NEW = 48


def _burst(url: str, n: int, press: dict | None = None) -> str:
    """n completion requests released together; then the server's /metrics text."""
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def one(i: int) -> None:
        body = {
            "model": "tiny-random",
            "prompt": PROMPT + str(i),
            "max_tokens": NEW,
            "temperature": 0,
            "ignore_eos": True,
        } | ({"press": press} if press else {})
        barrier.wait()
        codes.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * n
    return httpx.get(f"{url}/metrics").text


def _blocks(tiny, press=None) -> int:
    """The admission's worst case for one of the burst's requests (the server's 512-token chunks)."""
    from argen.cache.press import make_press

    request = Request(
        tiny.encode(PROMPT + "0", chat=False),
        SamplingParams(max_new_tokens=NEW, temperature=0),
        make_strategy("plain"),
        press=make_press(press) if press else None,
    )
    return DecodeBatch(tiny.engine, prefill_chunk=512).blocks_needed(request)


def test_kv_blocks_bound_the_sequences_held_at_once_and_the_gauges_show_it(tiny):
    per_request = _blocks(tiny)
    limit = 2 * per_request + per_request // 2  # room for two requests' worst cases, not three
    with running_server(tiny, max_batch=8, kv_blocks=limit, prefix_caching=False) as (url, _):
        text = _burst(url, 6)
    assert metric(text, "argen_kv_blocks_limit") == limit
    assert metric(text, "argen_running_sequences_peak") == 2
    assert 2 * (per_request - 1) <= metric(text, "argen_kv_blocks_held_peak") <= limit
    assert metric(text, "argen_running_sequences") == 0 and metric(text, "argen_kv_blocks_held") == 0
    # A press's smaller worst case lets more of the same requests in within the same blocks.
    pressed = {"name": "streaming-llm", "budget": 0.35}
    assert _blocks(tiny, pressed) * 3 <= limit
    with running_server(tiny, max_batch=8, kv_blocks=limit, prefix_caching=False) as (url, _):
        text = _burst(url, 6, pressed)
    assert metric(text, "argen_running_sequences_peak") >= 3
    assert metric(text, "argen_kv_blocks_held_peak") <= limit
    tiny.runtime.kv_pool().drop_cached()


def test_without_kv_blocks_the_same_burst_runs_wider(tiny):
    """The control: the first test's peak of 2 comes from the limit, not from the requests' timing."""
    with running_server(tiny, max_batch=8, prefix_caching=False) as (url, _):
        text = _burst(url, 6)
    assert metric(text, "argen_running_sequences_peak") >= 3
    assert metric(text, "argen_kv_blocks_limit") == tiny.runtime.kv_pool().max_blocks


@pytest.mark.parametrize("blocks", [0, -3])
def test_kv_blocks_below_one_is_refused(tiny, blocks):
    from argen.server.metrics import Metrics
    from argen.server.scheduler import Scheduler

    with pytest.raises(ValueError, match="kv_blocks must be >= 1"):
        Scheduler(tiny.engine, Metrics(), kv_blocks=blocks)
