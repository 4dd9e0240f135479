"""Serving benchmark: what continuous batching buys. `python -m benchmarks serving`

Starts `argen serve` in-process on a loopback port, sends N different Spec-Bench first-turn prompts
(chat endpoint, greedy, streaming, `max_tokens` new tokens with `ignore_eos` so every request
generates exactly that many) one after another, then the same N all at once, and writes
`report.md`, `results.json` and `latency.png`: total throughput both ways and their ratio, p50/p99
latency and time to first token, whether the concurrent outputs equal the sequential ones, and
the machine.

`--case NAME` runs one of the cases instead: `shared-prefix`, `burst`, `multi-turn` (two server
configurations on the same requests, serving_cases.py) and `press-capacity` (how many concurrent
long sequences a KV-cache press lets the server hold in the same `--kv-blocks`, serving_capacity.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

import argen
from argen.bench.questions import read_questions, select_questions
from argen.engine.pacing import PREFILL_SLOWDOWN
from argen.server.serve import make_server
from benchmarks.harness.provenance import describe, git_state, machine_info, portable_command, require_clean
from benchmarks.harness.serving_capacity import run_capacity, write_capacity_report
from benchmarks.harness.serving_cases import run_case, stream_request
from benchmarks.harness.serving_report import write_case_report
from benchmarks.harness.specbench import find_questions_file

PROG = "python -m benchmarks serving"


def _stream_one(url: str, model: str, prompt: str, max_tokens: int, strategy: str = "plain") -> dict:
    """One streaming chat request; client-side timings (perf_counter) and the token ids."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
        "strategy": strategy,
    }
    return stream_request(url, "/v1/chat/completions", body)


CACHED = "argen_prompt_tokens_cached_total"


def _metrics(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(("argen_batch_size_sum", "argen_batch_size_count", "argen_prompt_tokens_cached_total")):
            name, value = line.split()
            out[name] = float(value)
    return out


def _summary(runs: list[dict], wall: float) -> dict:
    lat = np.array([r["latency_s"] for r in runs])
    ttft = np.array([r["ttft_s"] for r in runs])
    tokens = sum(r["completion_tokens"] for r in runs)
    return {
        "requests": len(runs),
        "completion_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "latency_mean_s": float(lat.mean()),
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(args: argparse.Namespace) -> dict:
    all_questions = read_questions(args.questions or find_questions_file())
    gen = argen.load(args.model, quant=args.quant)
    if args.case != "concurrency":
        if args.case == "press-capacity":
            results = run_capacity(gen, args.model, all_questions, args)
        else:
            results = run_case(args.case, gen, args.model, all_questions, args)
        return results | {
            "command": args.command,
            "model": args.model,
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "machine": machine_info(getattr(args, "git_state", None)) | {"load_average": os.getloadavg()},
        }
    questions = select_questions(all_questions)[: args.clients]
    server = make_server(
        gen,
        "127.0.0.1",
        0,
        max_batch=args.clients,
        log_level="warning",
        model_id=args.model,
        prefill_slowdown=args.prefill_slowdown or None,
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        _stream_one(url, args.model, "Hello!", 4, args.strategy)  # warm-up (first-call allocations), not measured
        print(f"sequential: {len(questions)} requests one after another", file=sys.stderr)
        start = _metrics(url)
        t0 = time.perf_counter()
        sequential = [_stream_one(url, args.model, q.prompt, args.max_tokens, args.strategy) for q in questions]
        seq_wall = time.perf_counter() - t0
        print(f"concurrent: {len(questions)} requests at once", file=sys.stderr)
        # The server is idle: a cold prefix cache, so that the concurrent requests prefill their prompts
        # as the sequential ones did (else their prompts' blocks, kept or not by the pool's eviction
        # rule, decide the comparison).
        if gen.runtime.capabilities.paged_kv:
            gen.runtime.kv_pool().drop_cached()
        before = _metrics(url)
        concurrent: list = [None] * len(questions)
        barrier = threading.Barrier(len(questions))

        def client(i: int) -> None:
            barrier.wait()
            concurrent[i] = _stream_one(url, args.model, questions[i].prompt, args.max_tokens, args.strategy)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conc_wall = max(r["done"] for r in concurrent) - min(r["sent"] for r in concurrent)
        after = _metrics(url)
    finally:
        server.should_exit = True
        thread.join(60)
    steps = after["argen_batch_size_count"] - before["argen_batch_size_count"]
    results = {
        "command": args.command,
        "model": args.model,
        "quant": args.quant,
        "prefill_slowdown": args.prefill_slowdown,
        "clients": len(questions),
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "strategy": args.strategy,
        "case": "concurrency",
        "machine": machine_info(getattr(args, "git_state", None)) | {"load_average": os.getloadavg()},
        "sequential": _summary(sequential, seq_wall),
        "concurrent": _summary(concurrent, conc_wall),
        "concurrent_mean_batch": (after["argen_batch_size_sum"] - before["argen_batch_size_sum"]) / steps,
        "concurrent_steps": steps,
        "prompt_tokens": sum(r["prompt_tokens"] for r in sequential),
        "cached_prompt_tokens": {
            "sequential": before.get(CACHED, 0.0) - start.get(CACHED, 0.0),
            "concurrent": after.get(CACHED, 0.0) - before.get(CACHED, 0.0),
        },
        "identical_outputs": sum(a["token_ids"] == b["token_ids"] for a, b in zip(sequential, concurrent)),
        "requests": [
            {
                "question_id": q.question_id,
                "category": q.category,
                "prompt_tokens": s["prompt_tokens"],
                "sequential": {k: s[k] for k in ("latency_s", "ttft_s", "completion_tokens")},
                "concurrent": {k: c[k] for k in ("latency_s", "ttft_s", "completion_tokens")},
            }
            for q, s, c in zip(questions, sequential, concurrent)
        ],
    }
    results["speedup"] = results["concurrent"]["throughput_tok_s"] / results["sequential"]["throughput_tok_s"]
    return results


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if results.get("case", "concurrency") != "concurrency":
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (write_capacity_report if results["case"] == "press-capacity" else write_case_report)(results, out)
        return
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, out / "latency.png")
    s, c = results["sequential"], results["concurrent"]
    machine = ", ".join(
        f"{k} {' / '.join(f'{x:.2f}' for x in v) if isinstance(v, (list, tuple)) else v}"
        for k, v in results["machine"].items()
        if k != "dirty_files"
    )
    rows = [
        ("total throughput (new tok/s)", "throughput_tok_s", "{:.1f}"),
        ("wall time (s)", "wall_s", "{:.1f}"),
        ("latency p50 (s)", "latency_p50_s", "{:.2f}"),
        ("latency p99 (s)", "latency_p99_s", "{:.2f}"),
        ("time to first token p50 (s)", "ttft_p50_s", "{:.2f}"),
        ("time to first token p99 (s)", "ttft_p99_s", "{:.2f}"),
    ]
    table = ["| | one after another | all at once |", "|---|--:|--:|"]
    table += [f"| {label} | {fmt.format(s[key])} | {fmt.format(c[key])} |" for label, key, fmt in rows]
    n = results["clients"]
    cached = results.get("cached_prompt_tokens", {})
    step = {
        mode: float(
            np.mean(
                [
                    (r[mode]["latency_s"] - r[mode]["ttft_s"]) / max(1, r[mode]["completion_tokens"] - 1)
                    for r in results["requests"]
                ]
            )
        )
        for mode in ("sequential", "concurrent")
    }
    text = f"""# argen serve: continuous batching

```
{results["command"]}
```

{describe(results["machine"])}

Model `{results["model"]}` (weights `{results.get("quant", "auto")}`), {n} different Spec-Bench first-turn prompts (the first of each category,
round-robin; chat endpoint, streaming), greedy, exactly {results["max_tokens"]} new tokens each
(`ignore_eos`, so both runs generate the same number of tokens), {results["threads"]} torch threads,
{pacing(results.get("prefill_slowdown", PREFILL_SLOWDOWN))}.
The server runs in the benchmark's process on a loopback port; the clients are threads with
`httpx`. First the {n} requests one after another, then all {n} at once (released together).

**Total throughput with {n} concurrent clients: {c["throughput_tok_s"]:.1f} new tokens/s, {results["speedup"]:.2f}×
the {s["throughput_tok_s"]:.1f} tokens/s of the same requests sent one after another.**

{chr(10).join(table)}

- Latency: from sending the request to the last token; time to first token: to the first
  streamed token. p99 of {n} requests is close to the maximum. One after another, a request's
  latency leaves out its wait behind the earlier ones: {n} clients arriving together at a server
  that runs one request at a time would wait up to the whole {s["wall_s"]:.0f} s.
- While all {n} ran, a scheduler step decoded {results["concurrent_mean_batch"]:.1f} sequences on average
  ({results["concurrent_steps"]:.0f} steps).
- Prompt tokens whose keys came from the prefix cache, of {results.get("prompt_tokens", 0)} in each run:
  {cached.get("sequential", 0):.0f} one after another, {cached.get("concurrent", 0):.0f} all at once (the prefix
  cache is emptied between the two runs, so both prefill the same prompts).
- Concurrent outputs token-identical to the sequential ones: {results["identical_outputs"]}/{n}.
- A decode step (time between a request's first and last token over its tokens − 1, mean over
  requests) took {step["sequential"] * 1000:.0f} ms for one sequence and {step["concurrent"] * 1000:.0f} ms for {n} together:
  {step["concurrent"] / step["sequential"]:.1f}× the time for {n}× the tokens. A step of one sequence is bound by reading the
  weights from memory; a step of {n} reads them once for all {n} (and each row attends over its
  own cache only).
- Time to first token p50: {s["ttft_p50_s"]:.2f} s alone, {c["ttft_p50_s"]:.2f} s together (prompts are prefilled
  in chunks under each round's token budget, shortest first, beside the others' decoding).
- Strategy of every request: `{results.get("strategy", "plain")}`.

![latency and time-to-first-token distributions](latency.png)

Machine: {machine}. The machine is shared with other work, so absolute numbers are noisy; both
runs happen back to back in one process.
"""
    (out / "report.md").write_text(text)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("latency_s", "ttft_s"), ("latency", "time to first token")):
        for mode in ("sequential", "concurrent"):
            values = np.sort([r[mode][key] for r in results["requests"]])
            ax.step(
                values,
                np.arange(1, len(values) + 1) / len(values),
                where="post",
                label="one after another" if mode == "sequential" else "all at once",
            )
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results['clients']} requests, {results['max_tokens']} new tokens each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--prefill-slowdown",
        type=float,
        default=PREFILL_SLOWDOWN,
        help="concurrency: the server's pacing of long prefill chunks, as `argen serve --prefill-slowdown` "
        "(0: unpaced; default: %(default)s)",
    )
    parser.add_argument(
        "--quant", default="auto", help="the model's weight path, as `argen serve --quant` (default: %(default)s)"
    )
    parser.add_argument(
        "--case",
        default="concurrency",
        choices=["concurrency", "shared-prefix", "burst", "multi-turn", "press-capacity"],
        help="concurrency: N requests one after another, then at once (default); the others compare "
        "two server configurations on the same requests (see benchmarks/harness/serving_cases.py)",
    )
    parser.add_argument("--strategy", default="plain", help="concurrency: each request's strategy (default: plain)")
    parser.add_argument("--prefix-tokens", type=int, default=500, help="shared-prefix: system prompt tokens")
    parser.add_argument(
        "--question-chars",
        type=int,
        default=400,
        help="shared-prefix: the questions after the system prompt are the first Spec-Bench prompts "
        "shorter than this many characters (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="the cases' first configuration: prefill chunk size (default: the server's)",
    )
    parser.add_argument(
        "--step-tokens",
        type=int,
        default=None,
        help="the cases' first configuration: tokens per scheduler step (default: the server's)",
    )
    parser.add_argument("--long", type=int, default=8, help="burst: long prompts (default: %(default)s)")
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=1500,
        help="burst, press-capacity: tokens per long prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="press-capacity: the servers' KV memory in blocks of 16 positions (default: --fit times "
        "one unpressed request's worst case)",
    )
    parser.add_argument(
        "--fit",
        type=int,
        default=5,
        help="press-capacity: unpressed requests the default --kv-blocks holds (default: %(default)s)",
    )
    parser.add_argument("--press", default="streaming-llm", help="press-capacity: the press (default: %(default)s)")
    parser.add_argument(
        "--budgets",
        default="0.5,0.35",
        help="press-capacity: the press's budgets, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--turns", type=int, default=4, help="multi-turn: turns per chat (default: %(default)s)")
    parser.add_argument(
        "--gap", type=float, default=0.25, help="seconds between requests that arrive one by one (shared-prefix, burst)"
    )
    parser.add_argument(
        "--clients", type=int, default=16, help="requests, and concurrent clients (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--questions", help="Spec-Bench question.jsonl (default: found next to the project)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/serving"))
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write the report even though the working tree has uncommitted changes (recorded)",
    )
    return parser


def pacing(slowdown: float) -> str:
    if not slowdown:
        return "long prefill chunks unpaced (`--prefill-slowdown 0`)"
    return f"long prefill chunks paced to slow the others at most {slowdown:g}x (`--prefill-slowdown {slowdown:g}`)"


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if (
        args.clients < 1
        or args.max_tokens < 1
        or args.threads < 1
        or args.fit < 1
        or (args.kv_blocks is not None and args.kv_blocks < 1)
    ):
        parser.error("--clients, --max-tokens, --threads, --fit and --kv-blocks must be >= 1")
    args.git_state = git_state()
    require_clean(args.git_state, args.allow_dirty)
    args.command = portable_command([*PROG.split(), *(sys.argv[1:] if argv is None else argv)])
    results = run(args)
    write_report(results, args.out)
    if "speedup" in results:
        print(
            f"{results['speedup']:.2f}x: {results['concurrent']['throughput_tok_s']:.1f} vs "
            f"{results['sequential']['throughput_tok_s']:.1f} tok/s",
            file=sys.stderr,
        )
    print(f"report in {args.out}/report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
