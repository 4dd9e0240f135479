"""Serving benchmark cases for the one decode loop: `python -m benchmarks serving --case NAME`.

Each case starts two `argen serve` configurations in the same process, one after the other, on
loopback ports, sends them the same requests, and compares:

- `shared-prefix`: a long shared system prompt before each of N different questions, with and
  without prefix caching: prompt tokens computed, time to first token.
- `burst`: short requests arriving while a burst of long prompts is being prefilled, with chunked
  prefill (the default) and with whole prompts prefilled at once (as before chunking): the short
  requests' time to first token, and the decode throughput of the whole run.
- `multi-turn`: chats whose every turn resends the whole history, with and without prefix caching.
- `press-capacity` (serving_capacity.py): N long prompts at once into the same KV memory
  (`--kv-blocks`), without a press and with a press at each budget: the most sequences the server
  held at once, and the KV blocks they held.

Every figure comes with the outputs' check: both configurations must give the same tokens.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np

from argen.bench.questions import Question
from argen.server.serve import make_server


@contextmanager
def running_server(gen, model_id: str, **options):
    """An in-process server on a free loopback port; yields its URL."""
    server = make_server(gen, "127.0.0.1", 0, log_level="warning", model_id=model_id, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)


def metrics(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("argen_") and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


class MetricsPoller:
    """Reads /metrics every `every` seconds in a thread while the `with` block runs, handing each
    reading to `sample` (with the seconds since the block started)."""

    def __init__(self, url: str, every: float) -> None:
        self.url, self.every = url, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def sample(self, seconds: float, m: dict[str, float]) -> None:
        raise NotImplementedError

    def _poll(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.every):
            self.sample(time.perf_counter() - t0, metrics(self.url))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class KVSampler(MetricsPoller):
    """Polls /metrics while a case runs: KV bytes held (whole blocks) against the bytes the running
    sequences' lengths need, over the run (bytes-weighted: sum held / sum needed) and at the moment
    the sequences needed most. (A moment's ratio is meaningless when little is cached: one 17-token
    sequence holds two 16-position blocks, 1.9x its length.)"""

    def __init__(self, url: str, every: float = 0.2) -> None:
        super().__init__(url, every)
        self.samples: list[tuple[float, float]] = []  # (held, used)

    def sample(self, seconds: float, m: dict[str, float]) -> None:
        used, held = m.get("argen_kv_bytes_used", 0.0), m.get("argen_kv_bytes_held", 0.0)
        if used > 0:
            self.samples.append((held, used))

    @property
    def over_run(self) -> float:
        return sum(h for h, _ in self.samples) / max(sum(u for _, u in self.samples), 1.0)

    @property
    def at_peak(self) -> float:
        held, used = max(self.samples, key=lambda s: s[1], default=(0.0, 1.0))
        return held / used


def chat_once(
    url: str,
    model: str,
    messages: list[dict],
    max_tokens: int,
    delay: float = 0.0,
    strategy: str = "plain",
    press: dict | None = None,
) -> dict:
    """One streaming chat request after `delay` seconds (with a KV-cache press if given); client-side
    timings and the token ids."""
    time.sleep(delay)
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
        "strategy": strategy,
    } | ({"press": press} if press else {})
    return stream_request(url, "/v1/chat/completions", body)


def concurrently(calls: list) -> list[dict]:
    """Run the calls (functions of no arguments) on threads at once; their results in order."""
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def long_text(questions: list[Question], tokenizer, n_tokens: int, start: int = 0) -> str:
    """Text of about `n_tokens` tokens, from the longest Spec-Bench prompts (articles), in turn."""
    articles = sorted(questions, key=lambda q: -len(q.prompt))
    text, i = "", start
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += articles[i % len(articles)].prompt + "\n\n"
        i += 1
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def _configs(case: str, args) -> list[tuple[str, dict]]:
    scheduling = {
        k: v for k, v in (("prefill_chunk", args.prefill_chunk), ("step_tokens", args.step_tokens)) if v is not None
    }  # the server's defaults unless given
    if case == "burst":
        return [
            ("chunked prefill", scheduling),
            ("whole prompts at once", {"prefill_chunk": None, "step_tokens": None}),
        ]
    return [("prefix caching", scheduling), ("no prefix caching", scheduling | {"prefix_caching": False})]


def run_case(case: str, gen, model_id: str, questions: list[Question], args) -> dict:
    """Both configurations of `case` in turn (a warm-up request each first); per configuration its
    measured figures; and whether the outputs agree."""
    out = {
        "case": case,
        "configs": {},
        "prefix_tokens": args.prefix_tokens,
        "gap": args.gap,
        "long": args.long,
        "long_tokens": args.long_tokens,
        "turns": args.turns,
        "clients": args.clients,
        "question_chars": args.question_chars,
        "prefill_chunk": args.prefill_chunk,
        "step_tokens": args.step_tokens,
    }
    for label, options in _configs(case, args):
        if gen.runtime.capabilities.paged_kv:  # each configuration starts from a cold prefix cache
            gen.runtime.kv_pool().drop_cached()
        # Room for every request of the case at once (the server's default, 32, or more), so that
        # what is measured is the scheduling, not a queue for batch slots.
        everyone = args.clients + (args.long if case == "burst" else 0)
        with running_server(gen, model_id, max_batch=max(everyone, 32), **options) as url:
            chat_once(url, model_id, [{"role": "user", "content": "Hello!"}], 4)  # warm-up, not measured
            before = metrics(url)
            with KVSampler(url) as kv:
                t0 = time.perf_counter()
                runs = CASES[case](url, model_id, gen.tokenizer, questions, args)
                wall = time.perf_counter() - t0
            after = metrics(url)
        computed = (after["argen_prompt_tokens_total"] - before["argen_prompt_tokens_total"]) - (
            after["argen_prompt_tokens_cached_total"] - before["argen_prompt_tokens_cached_total"]
        )
        out["configs"][label] = summarize(runs, wall) | {
            "prompt_tokens_computed": computed,
            "kv_held_over_used": kv.over_run,
            "kv_held_over_used_at_peak": kv.at_peak,
        }
        out["configs"][label]["runs"] = [
            {k: v for k, v in r.items() if k != "token_ids"} | {"tokens": r["token_ids"]} for r in runs
        ]
    first, second = list(out["configs"].values())
    out["identical_outputs"] = sum(a["tokens"] == b["tokens"] for a, b in zip(first["runs"], second["runs"]))
    out["requests"] = len(first["runs"])
    return out


def summarize(runs: list[dict], wall: float) -> dict:
    tokens = sum(r["completion_tokens"] for r in runs)
    groups = {}
    for kind in sorted({r.get("kind", "all") for r in runs}):
        chosen = [r for r in runs if r.get("kind", "all") == kind]
        groups[kind] = {
            "n": len(chosen),
            "ttft_p50_s": percentile([r["ttft_s"] for r in chosen], 50),
            "ttft_p99_s": percentile([r["ttft_s"] for r in chosen], 99),
            "latency_p50_s": percentile([r["latency_s"] for r in chosen], 50),
        }
    return {"wall_s": wall, "completion_tokens": tokens, "throughput_tok_s": tokens / wall, "by_kind": groups}


# -- the cases ---------------------------------------------------------------------------------
def shared_prefix(url, model, tokenizer, questions, args) -> list[dict]:
    """N different questions behind one long system prompt, sent a little apart (as users do)."""
    system = long_text(questions, tokenizer, args.prefix_tokens)
    short = [q for q in questions if len(q.prompt) < args.question_chars][: args.clients]
    calls = [
        lambda q=q, i=i: chat_once(
            url,
            model,
            [{"role": "system", "content": system}, {"role": "user", "content": q.prompt}],
            args.max_tokens,
            delay=i * args.gap,
        )
        for i, q in enumerate(short)
    ]
    return concurrently(calls)


def burst(url, model, tokenizer, questions, args) -> list[dict]:
    """`--long` prompts of `--long-tokens` tokens at once, then `--clients` short ones arriving
    while they are prefilled."""
    longs = [long_text(questions, tokenizer, args.long_tokens, start=i) for i in range(args.long)]
    short = [q for q in questions if len(q.prompt) < 300][: args.clients]
    calls = [
        lambda t=t: (
            chat_once(url, model, [{"role": "user", "content": t + "\n\nSummarize the text above."}], args.max_tokens)
            | {"kind": "long"}
        )
        for t in longs
    ]
    calls += [
        lambda q=q, i=i: (
            chat_once(url, model, [{"role": "user", "content": q.prompt}], args.max_tokens, delay=args.gap * (i + 1))
            | {"kind": "short"}
        )
        for i, q in enumerate(short)
    ]
    return concurrently(calls)


def multi_turn(url, model, tokenizer, questions, args) -> list[dict]:
    """`--clients` chats of `--turns` turns each, every turn resending the whole history."""
    chats = [q for q in questions if len(q.prompt) < 600][: args.clients]

    def chat(first: Question) -> list[dict]:
        messages, runs = [], []
        follow = ["Tell me more.", "Give an example.", "Summarize that in one sentence.", "Why?"]
        for turn in range(args.turns):
            messages.append({"role": "user", "content": first.prompt if turn == 0 else follow[turn % len(follow)]})
            run = chat_once(url, model, messages, args.max_tokens) | {"kind": f"turn {turn + 1}"}
            messages.append(
                {"role": "assistant", "content": tokenizer.decode(run["token_ids"], skip_special_tokens=True)}
            )
            runs.append(run)
        return runs

    return [run for runs in concurrently([lambda q=q: chat(q) for q in chats]) for run in runs]


CASES = {"shared-prefix": shared_prefix, "burst": burst, "multi-turn": multi_turn}


def stream_request(url: str, path: str, body: dict) -> dict:
    """POST a streaming request; client-side timings (perf_counter), the token ids and the usage."""
    ids: list[int] = []
    sent = time.perf_counter()
    first = None
    usage = None
    with httpx.Client(timeout=None) as client, client.stream("POST", f"{url}{path}", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                if choice.get("token_ids"):
                    first = first or time.perf_counter()
                    ids += choice["token_ids"]
            usage = chunk.get("usage") or usage
    done = time.perf_counter()
    return {
        "sent": sent,
        "first_token": first,
        "done": done,
        "latency_s": done - sent,
        "ttft_s": first - sent,
        "token_ids": ids,
        "completion_tokens": len(ids),
        "prompt_tokens": usage["prompt_tokens"],
    }
