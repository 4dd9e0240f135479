"""What the bild and fs-gen tests share: the prompt, the small model, a server with it loaded, a post,
a request served as the API runs it, the command line against the API, and a hostile option's 400."""

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


def assert_served_as_the_api(url: str, gen, small, spec: dict) -> None:
    """A request naming the loaded small model `s`, and one naming none (the first loaded), get the
    API's tokens and record (return_origins stats) for `spec` with `small`."""
    want = run(gen, spec | {"small": small})
    for named in ({"small": "s"}, {}):
        r = post(url, spec | named, return_token_ids=True, return_origins=True)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == want.token_ids
        assert choice["stats"]["strategy_record"] == want.extras[spec["name"]]


def assert_refused(url: str, spec, words: str, secrets=("/tmp", ".cache", "/etc")) -> None:
    """A request with `spec` gets a 400 whose message says `words` and echoes none of `secrets` (the
    paths it was sent)."""
    r = post(url, spec)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert words in message
    for secret in secrets:
        assert secret not in message, message


def assert_cli_runs_as_the_api(gen, small, strategy: str, options: dict, capsys) -> None:
    """`argen generate --strategy STRATEGY --strategy-opt small=SMALL` with `options` prints the API's
    tokens for the same options: ones under which the small model decides every token, unlike plain
    decoding, so an option the command line dropped would show."""
    from argen.cli import main

    argv = ["generate", PROMPT, "--model", "tiny-random", "--no-chat", "--max-new-tokens", "12", "--json"]
    argv += ["--strategy", strategy, "--strategy-opt", f"small={SMALL}"]
    for key, value in options.items():
        argv += ["--strategy-opt", f"{key}={value}"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    spec = {"name": strategy, "small": small, **options}
    want = gen.generate(PROMPT, chat=False, max_new_tokens=12, temperature=0, strategy=spec).token_ids
    plain = gen.generate(PROMPT, chat=False, max_new_tokens=12, temperature=0).token_ids
    assert got["strategy"] == strategy and got["token_ids"] == want != plain
