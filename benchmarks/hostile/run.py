"""Issue 24's hostile clients and faults against `argen serve` on the default model, with a steady client.

    python benchmarks/hostile/run.py --out benchmarks/hostile [--compare-unpaced] [--allow-dirty]

Starts `argen serve` (this checkout's code) in a process of its own, measures a steady client's
latency (a 16-token greedy completion, back to back) while idle, then sends each hostile case while
the steady client runs. For each case: the hostile request's status and time, the steady client's
median latency during the case against its median just before (idle, measured again before every
case so that load from elsewhere on the machine hits both alike), and the server's resident memory
(the server process plus its grammar children) before and after, each taken once the server has been
idle for a moment (an idle server gives freed heap back: argen/server/memory.py). The acceptance (issue 24): every
case answered 4xx (or served) within 5 s, unless it is a long prompt that is served; the steady
client at most 2x its idle latency; the memory back at its baseline. `--compare-unpaced` runs the
long-prompt cases again on a server with `--prefill-slowdown 0` (no pacing: the behaviour before).
Writes report.md and results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # this checkout's argen, and the `benchmarks` package

from argen.server.memory import TRIM_AFTER_IDLE_S
from benchmarks.harness.provenance import provenance, script_args

MODEL = "default"
ORIGIN = "https://app.example.com"
STEADY = {"model": MODEL, "prompt": "The history of rivers", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
LIVE_S = 5.0


class Server:
    """`argen serve` in a process of its own, on a free port."""

    def __init__(self, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "argen.cli",
                "serve",
                "--model",
                MODEL,
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--allowed-origins",
                ORIGIN,
                *extra,
            ],
            env=env,
        )
        deadline = time.monotonic() + 600
        while True:
            assert self.proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def rss_mb(self) -> float:
        """The server's resident memory and its children's (the grammar sandbox), MB."""
        return sum(_rss_kb(pid) for pid in [self.proc.pid, *_children(self.proc.pid)]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (FileNotFoundError, StopIteration):
        return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


class Steady:
    """A client sending STEADY back to back in a thread; each latency with its start and end."""

    def __init__(self, url: str) -> None:
        self.url, self.samples, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=600) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                r = client.post(f"{self.url}/v1/completions", json=STEADY)
                assert r.status_code == 200, r.text
                self.samples.append((started, time.perf_counter()))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def during(self, start: float, end: float) -> list[float]:
        """Latencies of the requests that overlapped [start, end]."""
        return [b - a for a, b in self.samples if b >= start and a <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(600)


def idle_latency(url: str, n: int = 5) -> float:
    with httpx.Client(timeout=600) as client:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            assert client.post(f"{url}/v1/completions", json=STEADY).status_code == 200
            times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- the cases: each returns (status, note) ----------------------------------------------------------
def _post(url: str, body: dict, path: str = "completions", **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body}, timeout=900, **kw)


def _schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _patterns(n: int, nested: bool) -> dict:
    if not nested:
        return {"allOf": [{"type": "string", "pattern": f".*a{i}.*"} for i in range(n)]}
    return {
        "$defs": {f"p{i}": {"type": "string", "pattern": f".*a{i}.*"} for i in range(n)},
        "type": "object",
        "properties": {"x": {"allOf": [{"$ref": f"#/$defs/p{i}"} for i in range(n)]}},
    }


def _error(r: httpx.Response) -> str:
    return r.json()["error"]["message"][:90] if r.status_code >= 400 else ""


def allof_200(url):
    r = _post(url, {"prompt": "Hi", "max_tokens": 8, "response_format": _schema(_patterns(200, False))})
    return str(r.status_code), _error(r)


def refs_16(url):
    r = _post(url, {"prompt": "Hi", "max_tokens": 8, "response_format": _schema(_patterns(16, True))})
    return str(r.status_code), _error(r)


def six_costly_grammars(url):
    body = {"prompt": "Hi", "max_tokens": 8, "response_format": _schema(_patterns(16, True))}
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(_post(url, body).status_code)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return "/".join(str(c) for c in sorted(codes)), "2 compile at a time (400 at the deadline), the rest 429"


def lark_9000(url):
    grammar = "start: " + " | ".join(f'"w{i}"' for i in range(9000))
    r = _post(url, {"prompt": "Hi", "max_tokens": 8, "response_format": {"type": "grammar", "grammar": grammar}})
    return str(r.status_code), _error(r)


def tiny_temperature(url):
    body = {"prompt": "The river", "max_tokens": 8, "logprobs": 2, "return_token_ids": True}
    r = _post(url, body | {"temperature": 1e-38, "seed": 3})
    greedy = _post(url, body | {"temperature": 0}).json()["choices"][0]
    same = r.status_code == 200 and r.json()["choices"][0]["token_ids"] == greedy["token_ids"]
    return str(r.status_code), f"tokens equal greedy's: {same}"


def disconnect(url):
    body = {"model": MODEL, "prompt": "Tell a long story", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)

    def gauges() -> str:  # read once the steady client has stopped too
        time.sleep(1.0)
        text = httpx.get(f"{url}/metrics").text
        names = ("argen_running_sequences", "argen_kv_blocks_held")
        return "then " + ", ".join(f"{name} {_metric(text, name):g}" for name in names)

    return "200, cut", gauges


def _metric(text: str, name: str) -> float:
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


def long_prompt(url, step: int = 7):
    ids = [(step * i) % 40000 + 100 for i in range(8191)]  # each `step` its own prompt: no prefix-cache hits
    r = _post(url, {"prompt": ids, "max_tokens": 1})
    return str(r.status_code), ""


def echo_logprobs(url):
    ids = [(7 * i) % 40000 + 100 for i in range(8000)]
    r = _post(url, {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 20})
    return str(r.status_code), f"response {len(r.content) / 2**20:.1f} MB"


def messages_20000(url):
    r = _post(url, {"messages": [{"role": "user", "content": ""}] * 20000, "max_tokens": 4}, "chat/completions")
    return str(r.status_code), _error(r)


def logit_bias_oov(url):
    r = _post(url, {"prompt": "Hi", "max_tokens": 4, "logit_bias": {"999999": 5}})
    return str(r.status_code), f"param {r.json()['error']['param']}"


def cors_preflight(url):
    r = httpx.options(
        f"{url}/v1/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    return str(r.status_code), f"allow-origin {r.headers.get('access-control-allow-origin')}"


CASES = [  # (issue item, what, function, served: a 200 is its right answer)
    ("1", "allOf of 200 `.*aN.*` patterns", allof_200, False),
    ("1", "16 patterns behind $refs (past the static bound)", refs_16, False),
    ("1", "6 such grammars at once", six_costly_grammars, False),
    ("5", "Lark grammar of 9,000 alternatives", lark_9000, False),
    ("3", "temperature 1e-38", tiny_temperature, True),
    ("4", "a stream cut after 4 events, then /metrics", disconnect, True),
    ("6", "8,191-token prompt", long_prompt, True),
    ("6", "echo + logprobs 20 on 8,000 tokens", echo_logprobs, True),
    ("6", "the same echo + logprobs again (memory: nothing more)", echo_logprobs, True),
    ("7", "20,000 empty chat messages", messages_20000, False),
    ("8", "out-of-vocabulary logit_bias key", logit_bias_oov, False),
    ("8", "CORS preflight (--allowed-origins)", cors_preflight, True),
]
LONG = {"8,191-token prompt", "echo + logprobs 20 on 8,000 tokens"}  # (the repeat is a memory check only)


def idle_rss(server: Server) -> float:
    """The server's memory once it has been idle long enough to trim its heap (as it does between bursts)."""
    time.sleep(TRIM_AFTER_IDLE_S + 1.0)
    return server.rss_mb()


def run_cases(server: Server, cases: list) -> list[dict]:
    rows = []
    for item, what, case, served in cases:
        idle = idle_latency(server.url)
        rss_before = idle_rss(server)
        steady = Steady(server.url)
        while steady.alive and not steady.samples:
            time.sleep(0.05)
        started = time.perf_counter()
        status, note = case(server.url)
        ended = time.perf_counter()
        while steady.alive and not any(a > ended for a, _ in steady.samples):  # its last request counts whole
            time.sleep(0.05)
        steady.stop()
        if callable(note):
            note = note()
        during = steady.during(started, ended)
        row = {
            "item": item,
            "case": what,
            "status": status,
            "seconds": round(ended - started, 2),
            "note": note,
            "idle_s": round(idle, 3),
            "steady_s": round(statistics.median(during), 3),
            "steady_n": len(during),
            "steady_mean_s": round(statistics.mean(during), 3),
            "steady_max_s": round(max(during), 3),
            "ratio": round(statistics.median(during) / idle, 2),
            "mean_ratio": round(statistics.mean(during) / idle, 2),
            "rss_before_mb": round(rss_before),
            "rss_after_mb": round(idle_rss(server)),
            "served": served,
        }
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def report(out: Path, prov: dict, command: str, rows: list[dict], unpaced: list[dict], baseline: float) -> str:
    lines = [
        "# argen serve: hostile clients and faults (issue 24)",
        "",
        "```",
        command,
        "```",
        "",
        f"Provenance: commit {prov['git_commit']}{' (dirty: ' + ', '.join(prov['dirty_files']) + ')' if prov['git_dirty'] else ', clean working tree'}; "
        f"CPU: {prov['cpu_model']} ({prov['cpu_count']} cores); torch {prov['torch']}; {prov['date']}.",
        "",
        f"The server: `argen serve --model default` (defaults: `--prefill-slowdown 1.5`, 512-token chunks, "
        f"grammar sandbox 2 s / 1024 MB / 2 at a time). Steady client: a 16-token greedy completion, back to "
        f"back; *idle* is its median latency just before each case, *during* its median over the requests "
        f"that overlapped the case. Memory: the server's resident set plus its grammar children, "
        f"read once the server has been idle {TRIM_AFTER_IDLE_S + 1:.0f} s (it gives freed heap back after "
        f"{TRIM_AFTER_IDLE_S:.0f} s idle); baseline after warm-up (one long prompt first, so the KV blocks a long prompt touches are in it): "
        f"{baseline:.0f} MB.",
        "",
        "| item | case | status | answered in (s) | note | steady idle (s) | steady during: median / mean / "
        "max (s) | ratio: median / mean | steady requests | RSS before → after (MB) |",
        "|---|---|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['item']} | {r['case']} | {r['status']} | {r['seconds']} | {r['note']} | {r['idle_s']} | "
            f"{r['steady_s']} / {r['steady_mean_s']} / {r['steady_max_s']} | {r['ratio']} / "
            f"{r['mean_ratio']} | {r['steady_n']} | {r['rss_before_mb']} → {r['rss_after_mb']} |"
        )
    if unpaced:
        lines += [
            "",
            "The long-prompt cases again on a server with `--prefill-slowdown 0` (no pacing, as before):",
            "",
            "| case | status | answered in (s) | steady idle (s) | steady during: median / mean / max (s) | "
            "ratio: median / mean | steady requests |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for r in unpaced:
            lines.append(
                f"| {r['case']} | {r['status']} | {r['seconds']} | {r['idle_s']} | {r['steady_s']} / "
                f"{r['steady_mean_s']} / {r['steady_max_s']} | {r['ratio']} / {r['mean_ratio']} | "
                f"{r['steady_n']} |"
            )
    final = rows[-1]["rss_after_mb"]
    lines += [
        "",
        f"Memory after the last case: {final} MB against the {baseline:.0f} MB baseline ({final - baseline:+.0f} MB).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps({"provenance": prov, "baseline_rss_mb": baseline, "cases": rows, "unpaced": unpaced}, indent=1)
        + "\n"
    )
    return text


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "hostile")
        parser.add_argument("--compare-unpaced", action="store_true", help="also run the long prompts unpaced")

    args, state = script_args(__doc__, add=options)
    prov = provenance(state)
    command = "python benchmarks/hostile/run.py " + " ".join(sys.argv[1:])
    server = Server()
    try:
        long_prompt(server.url, step=11)  # warm-up: the KV blocks a long prompt needs are then in the baseline
        idle_latency(server.url)
        baseline = idle_rss(server)
        rows = run_cases(server, CASES)
    finally:
        server.stop()
    unpaced = []
    if args.compare_unpaced:
        server = Server("--prefill-slowdown", "0")
        try:
            long_prompt(server.url, step=11)
            unpaced = run_cases(server, [c for c in CASES if c[1] in LONG])
        finally:
            server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    print(report(args.out, prov, command, rows, unpaced, baseline))


if __name__ == "__main__":
    main()
