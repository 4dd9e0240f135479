"""What the bild and fs-gen tests share: the prompt, the small model, a server with it loaded, a post."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

PROMPT = "The quick brown fox"
N = 24
SMALL = "tiny-random@1"  # the tiny model with other weights: the same byte-level vocabulary


def run(gen, spec, **fields):
    """Greedy decoding of PROMPT, N tokens, with strategy `spec`."""
    return gen.generate(PROMPT, chat=False, max_new_tokens=N, temperature=0, ignore_eos=True, strategy=spec, **fields)


@contextmanager
def small_server(tiny) -> Iterator[str]:
    """A server of the tiny model with the small model SMALL loaded as `s`; yields its URL."""
    from server_helpers import running_server

    from argen.server.companions import Companions

    companions = Companions.load(tiny, "tiny-random", smalls=[f"s={SMALL}"])
    with running_server(tiny, companions=companions) as (url, _):
        yield url


def post(url: str, spec, prompt=PROMPT, **fields):
    import httpx

    body = {"model": "tiny-random", "prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True}
    return httpx.post(
        f"{url}/v1/completions",
        content=json.dumps(body | {"strategy": spec, **fields}).encode(),
        headers={"content-type": "application/json"},
        timeout=120,
    )
