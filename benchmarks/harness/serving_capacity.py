"""`python -m benchmarks serving --case press-capacity`: how many concurrent long sequences a KV-cache
press lets the server hold in the same KV memory.

`--clients` distinct prompts of `--long-tokens` tokens (Spec-Bench articles, each prompt numbered and
starting at a different one, then "Summarize the text above.") are sent at once, `--max-tokens` new tokens each,
to servers that share one KV memory: `--kv-blocks` blocks of 16 positions, by default `--fit` times
the blocks one unpressed request may need, so that only `--fit` fit without a press. The servers run
one after the other in this process: without a press, then with `--press` at each of `--budgets`
(the request field `press: {"name": ..., "budget": ...}`). Prefix caching is off in all of them, so
no configuration is helped by blocks another request computed.

Measured from the server's /metrics: the most sequences running at once (`argen_running_sequences_peak`),
the most KV blocks held at once (`argen_kv_blocks_held_peak`, inside steps too: a prefill chunk
before its press), and a timeline of both (polled); from the clients: wall time, throughput, time
to first token, latency. Beside them, what the admission rule computes: each request's reserved worst
case (`DecodeBatch.blocks_needed`) and how many such fit in the blocks. Outputs of a lossy press
differ from the unpressed ones; their greedy agreement is reported, not checked.
"""

from __future__ import annotations

import time

from argen.cache.press import make_press
from argen.engine import DecodeBatch, Request
from argen.sampling import SamplingParams
from argen.server.scheduler import PREFILL_CHUNK
from argen.strategies import make_strategy
from benchmarks.harness.drift import agreement
from benchmarks.harness.provenance import describe
from benchmarks.harness.serving_cases import (
    MetricsPoller,
    chat_once,
    concurrently,
    long_text,
    metrics,
    percentile,
    running_server,
)

QUESTION = "\n\nSummarize the text above."


class Timeline(MetricsPoller):
    """Polls /metrics while a configuration runs: (seconds since start, sequences running, blocks held)."""

    def __init__(self, url: str, every: float = 0.25) -> None:
        super().__init__(url, every)
        self.points: list[tuple[float, float, float]] = []

    def sample(self, seconds: float, m: dict[str, float]) -> None:
        self.points.append((seconds, m.get("argen_running_sequences", 0.0), m.get("argen_kv_blocks_held", 0.0)))


def configurations(args) -> list[tuple[str, dict | None]]:
    budgets = [float(b) for b in str(args.budgets).split(",") if b.strip()]
    return [("no press", None)] + [(f"{args.press} {b:g}", {"name": args.press, "budget": b}) for b in budgets]


def prompts(gen, questions, args) -> list[list[dict]]:
    """Each client's chat messages: a numbered long text (starting at a different article; the number
    keeps prompts distinct when there are more clients than articles) and the question."""
    return [
        [
            {
                "role": "user",
                "content": f"Text {i + 1}.\n\n"
                + long_text(questions, gen.tokenizer, args.long_tokens, start=i)
                + QUESTION,
            }
        ]
        for i in range(args.clients)
    ]


def reserved_blocks(gen, messages: list[list[dict]], args, press: dict | None) -> int:
    """The most KV blocks the admission reserves for one of these requests (its worst case)."""
    batch = DecodeBatch(gen.engine, prefill_chunk=args.prefill_chunk or PREFILL_CHUNK)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    return max(
        batch.blocks_needed(
            Request(gen.encode(m), params, make_strategy("plain"), press=make_press(press) if press else None)
        )
        for m in messages
    )


def run_capacity(gen, model_id: str, questions, args) -> dict:
    messages = prompts(gen, questions, args)
    unpressed = reserved_blocks(gen, messages, args, None)
    kv_blocks = args.fit * unpressed if args.kv_blocks is None else args.kv_blocks
    scheduling = {
        k: v for k, v in (("prefill_chunk", args.prefill_chunk), ("step_tokens", args.step_tokens)) if v is not None
    }  # the server's defaults unless given
    out = {
        "case": "press-capacity",
        "clients": args.clients,
        "long_tokens": args.long_tokens,
        "kv_blocks": kv_blocks,
        "fit": args.fit if args.kv_blocks is None else None,
        "press": args.press,
        "prefill_chunk": args.prefill_chunk,
        "step_tokens": args.step_tokens,
        "block_bytes": gen.runtime.kv_pool().bytes_per_block(),
        "prompt_tokens": [len(gen.encode(m)) for m in messages],
        "configs": {},
    }
    for label, press in configurations(args):
        gen.runtime.kv_pool().drop_cached()
        reserve = reserved_blocks(gen, messages, args, press)
        # max_batch is no limit here: only the KV memory decides how many run at once.
        with running_server(
            gen, model_id, max_batch=max(args.clients, 32), prefix_caching=False, kv_blocks=kv_blocks, **scheduling
        ) as url:
            chat_once(url, model_id, [{"role": "user", "content": "Hello!"}], 4)  # warm-up, not measured
            with Timeline(url) as timeline:
                t0 = time.perf_counter()
                runs = concurrently(
                    [lambda m=m, p=press: chat_once(url, model_id, m, args.max_tokens, press=p) for m in messages]
                )
                wall = time.perf_counter() - t0
            after = metrics(url)
        tokens = sum(r["completion_tokens"] for r in runs)
        out["configs"][label] = {
            "press": press,
            "reserved_blocks": reserve,
            "fit_by_admission": kv_blocks // reserve,
            "peak_sequences": after["argen_running_sequences_peak"],
            "peak_blocks": after["argen_kv_blocks_held_peak"],
            "kv_blocks_limit": after["argen_kv_blocks_limit"],
            "wall_s": wall,
            "completion_tokens": tokens,
            "throughput_tok_s": tokens / wall,
            "ttft_p50_s": percentile([r["ttft_s"] for r in runs], 50),
            "ttft_p99_s": percentile([r["ttft_s"] for r in runs], 99),
            "latency_p50_s": percentile([r["latency_s"] for r in runs], 50),
            "latency_p99_s": percentile([r["latency_s"] for r in runs], 99),
            "timeline": [[round(t, 2), s, b] for t, s, b in timeline.points],
            "runs": [{k: v for k, v in r.items() if k != "token_ids"} | {"tokens": r["token_ids"]} for r in runs],
        }
    base = out["configs"]["no press"]
    for config in out["configs"].values():
        config["sequences_vs_no_press"] = config["peak_sequences"] / base["peak_sequences"]
        agree = [agreement(a["tokens"], b["tokens"]) for a, b in zip(base["runs"], config["runs"])]
        config["token_agreement"] = sum(a.token_agreement for a in agree) / len(agree)
        config["first_divergence"] = sum(a.first_divergence for a in agree) / len(agree)
    out["requests"] = args.clients
    return out


def write_capacity_report(results: dict, out) -> None:
    configs, k = results["configs"], results["kv_blocks"]
    labels = list(configs)
    rows = ["| | " + " | ".join(labels) + " |", "|---|" + "--:|" * len(labels)]

    def row(name: str, key: str, fmt: str) -> None:
        rows.append(f"| {name} | " + " | ".join(fmt.format(configs[c][key]) for c in labels) + " |")

    row("**most sequences running at once (measured)**", "peak_sequences", "**{:.0f}**")
    row("× the unpressed server's", "sequences_vs_no_press", "{:.2f}×")
    row("KV blocks reserved per request (admission's worst case)", "reserved_blocks", "{:.0f}")
    row(f"requests whose worst case fits in {k} blocks", "fit_by_admission", "{:.0f}")
    row(f"most KV blocks held at once (of {k})", "peak_blocks", "{:.0f}")
    row("wall time (s)", "wall_s", "{:.1f}")
    row("throughput (new tok/s)", "throughput_tok_s", "{:.1f}")
    for name, key in (("time to first token", "ttft"), ("latency", "latency")):
        rows.append(
            f"| {name} p50 / p99 (s) | "
            + " | ".join(f"{configs[c][key + '_p50_s']:.1f} / {configs[c][key + '_p99_s']:.1f}" for c in labels)
            + " |"
        )
    row("greedy token agreement with no press", "token_agreement", "{:.2f}")
    row("tokens before the first divergence (mean)", "first_divergence", "{:.1f}")
    prompt = results["prompt_tokens"]
    best = max(labels[1:], key=lambda c: configs[c]["sequences_vs_no_press"]) if len(labels) > 1 else labels[0]
    fit = f", {results['fit']} unpressed requests' worst cases" if results.get("fit") else ""
    mb = k * results["block_bytes"] / 2**20
    text = f"""# argen serve: press-capacity

```
{results["command"]}
```

{describe(results["machine"])}

Model `{results["model"]}`; {results["requests"]} distinct prompts of {min(prompt)}–{max(prompt)} tokens
(numbered, Spec-Bench articles from a different one each, then "Summarize the text above.") sent at
once, greedy, {results["max_tokens"]} new tokens each (`ignore_eos`), {results["threads"]} torch threads. The same
KV memory for every configuration: `--kv-blocks {k}` ({k} blocks of 16 positions, {mb:.1f} MiB{fit}).
One server per configuration, one after the other in this process, prefix caching off in all of
them: no press, then the request field `press: {{"name": "{results["press"]}", "budget": b}}`.

**With `{best}`, the server held {configs[best]["peak_sequences"]:.0f} sequences at once, {configs[best]["sequences_vs_no_press"]:.2f}× the
{configs[labels[0]]["peak_sequences"]:.0f} it held without a press, in the same {k} KV blocks.**

{chr(10).join(rows)}

- Most sequences running at once: `argen_running_sequences_peak` (sequences admitted, prefilling or
  decoding). The scheduler admits a request when its worst case fits beside the running ones'
  (`DecodeBatch.blocks_needed`; a pressed prompt is prefilled in chunks of at most 128 tokens and
  pressed after each, so its worst case is the pressed prefix plus a chunk), so the measured peak
  can only reach the row below it; it falls short when requests finish before the last are admitted.
- Most KV blocks held at once: `argen_kv_blocks_held_peak`, the pool's peak inside steps too. It
  stays under the reservations, which are worst cases.
- A press is lossy: its outputs differ from the unpressed ones (agreement rows); `python -m benchmarks drift`
  measures what that costs.

![sequences running and KV blocks held over time](capacity.png)
"""
    (out / "report.md").write_text(text)
    _plot(results, out / "capacity.png")


def _plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, config in results["configs"].items():
        points = config["timeline"] or [[0.0, 0.0, 0.0]]
        t = [p[0] for p in points]
        axes[0].step(t, [p[1] for p in points], where="post", label=label)
        axes[1].step(t, [p[2] for p in points], where="post", label=label)
    axes[1].axhline(results["kv_blocks"], color="black", linestyle="--", linewidth=1, label="--kv-blocks")
    for ax, name in zip(axes, ("sequences running", "KV blocks held")):
        ax.set_xlabel("seconds")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results['requests']} prompts at once into {results['kv_blocks']} KV blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
