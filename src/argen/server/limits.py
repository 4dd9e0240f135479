"""Server-side caps on the strategy options that scale a request's work or memory.

Over HTTP a client chooses the strategy and its options, and some options multiply what one
request costs everyone else: beams are rows of the KV cache and of every forward pass, a draft
tree is fed whole to each verification pass, an n-gram length is work per token. The Python API
and the CLI take any value (the caller pays); the server refuses a request over a cap with a 400
before anything is queued. The defaults keep every step within a few times a plain step on a CPU;
`argen serve --limit NAME=VALUE` changes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from argen.cache.press import Press
from argen.errors import ArgenError
from argen.strategies import Strategy, strategy_options

# name -> (default cap, what it bounds). Lists and strings are capped by their length.
OPTION_LIMITS: dict[str, tuple[int, str]] = {
    "num_beams": (8, "beam, conditional-beam: beams, each a KV-cache row in every forward pass"),
    "loop_ngram": (16, "conditional-beam: the n-gram that may not repeat, checked over each beam's output every step"),
    "max_draft": (
        16,
        "prompt-lookup, ngram, layer-skip, draft-model: draft tokens per verification pass; draft-head: "
        "the draft tree's depth (a head pass a level)",
    ),
    "num_drafts": (4, "draft-model: chains drafted per step under sampling"),
    "max_nodes": (32, "ngram, draft-head: draft-tree nodes per verification pass"),
    "width": (
        8,
        "ngram: continuations tried per tree node; draft-head: children per node and nodes grown per level "
        "(the rows of each head pass)",
    ),
    "max_n": (8, "ngram: the longest n-gram counted (table work per token)"),
    "max_ngram": (8, "prompt-lookup: the longest n-gram matched (search work per step)"),
    "window": (8, "jacobi: guesses iterated per pass"),
    "ngram": (8, "jacobi: the longest n-gram harvested"),
    "candidates": (4, "jacobi: n-gram branches verified per pass"),
    "top_k": (16, "contrastive: candidates fed per step"),
    "skip_layers": (64, "layer-skip: entries of the list"),
    "skip_ffn": (64, "layer-skip: entries of the list"),
    "max_pending": (16, "bild: small-model tokens the large model checks in one pass (its rows)"),
    "k": (16, "superposed: drafts kept, each scored against k candidates a step (the pass stays one row)"),
    "steps": (8, "srgen: Adam steps per trigger (two vocabulary-projection GEMVs and a window softmax each)"),
    "prefix_window": (64, "srgen: context rows of a trigger's loss (vocabulary-projection rows per trigger)"),
    "positive_prefix": (2000, "guided: characters of the control prefix the guide reads"),
    "negative_prefix": (2000, "guided: characters of the control prefix the guide reads"),
}
# Caps on KV-cache press options (cache/press.py), changed the same way: positions a press keeps
# whatever the budget; they are clipped to the budget's positions, so the cap only refuses nonsense.
PRESS_LIMITS: dict[str, tuple[int, str]] = {
    "sinks": (1024, "streaming-llm, kvmerger: first positions always kept"),
    "recent": (8192, "kvmerger: last positions never merged; kv-quant, gear: last positions never quantized"),
    "window_size": (128, "snapkv: newest queries a sequence keeps (every layer's) and scores positions by"),
}
# Caps on request fields that multiply a request's work, changed the same way (`--limit n=32`).
REQUEST_LIMITS: dict[str, tuple[int, str]] = {
    "n": (
        16,
        "samples per request: each is a sequence of the batch (a slot of --max-batch) with its own KV cache "
        "past the shared prompt; n x max_tokens must also be within --max-tokens",
    ),
}


def default_option_limits() -> dict[str, int]:
    return {name: cap for name, (cap, _) in (OPTION_LIMITS | PRESS_LIMITS | REQUEST_LIMITS).items()}


@dataclass(frozen=True)
class Limits:
    options: dict[str, int] = field(default_factory=default_option_limits)

    @classmethod
    def parse(cls, pairs: list[str]) -> Limits:
        """From `NAME=VALUE` pairs (`--limit`), over the defaults."""
        options = default_option_limits()
        for pair in pairs:
            name, sep, raw = pair.partition("=")
            name = name.strip()
            if name not in OPTION_LIMITS and name not in PRESS_LIMITS and name not in REQUEST_LIMITS:
                raise ArgenError(
                    f"--limit {pair!r}: unknown limit {name!r}; limits: "
                    f"{', '.join([*OPTION_LIMITS, *PRESS_LIMITS, *REQUEST_LIMITS])}"
                )
            if not sep or not raw.strip().isdigit() or int(raw) < 1:
                raise ArgenError(f"--limit takes NAME=VALUE with a whole number >= 1 (e.g. num_beams=16); got {pair!r}")
            options[name] = int(raw)
        return cls(options)

    @property
    def max_n(self) -> int:
        """The most samples (`n`) one request may ask for."""
        return self.options["n"]

    def fit_defaults(self, cls: type[Strategy], options: dict) -> dict:
        """`options` with each capped option the client left out, whose default is over this server's cap
        (an operator who lowered `--limit max_draft=4`), set to the cap: a request that names only the
        strategy runs within the limits rather than being refused for a value it never sent."""
        fitted = dict(options)
        for name, default in strategy_options(cls).items():
            cap = self.options.get(name) if name in OPTION_LIMITS else None
            if cap is None or name in fitted or isinstance(default, bool) or not isinstance(default, int):
                continue
            if default > cap:
                fitted[name] = cap
        return fitted

    def check(self, strategy: Strategy) -> str | None:
        """What is over a cap in `strategy`'s options (a message saying what to ask for), or None."""
        given = strategy_options(type(strategy))  # constructor options, not derived attributes
        for name, value in strategy.options().items():
            cap = self.options.get(name) if name in OPTION_LIMITS else None
            if cap is None or name not in given or isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int) and value > cap:
                return (
                    f"option {name} of strategy {strategy.name!r} is {value}, but this server allows at most {cap} "
                    f"({OPTION_LIMITS[name][1]}); ask for {cap} or less"
                )
            if isinstance(value, str | list | tuple) and len(value) > cap:
                unit = "characters" if isinstance(value, str) else "entries"
                return (
                    f"option {name} of strategy {strategy.name!r} has {len(value)} {unit}, but this server allows at "
                    f"most {cap}; shorten it"
                )
        return None

    def check_press(self, press: Press) -> str | None:
        """What is over a cap in `press`'s options (a message saying what to ask for), or None."""
        for name, value in press.options().items():
            cap = self.options.get(name) if name in PRESS_LIMITS else None
            if cap is not None and isinstance(value, int) and value > cap:
                return (
                    f"option {name} of press {press.name!r} is {value}, but this server allows at most {cap} "
                    f"({PRESS_LIMITS[name][1]}); ask for {cap} or less"
                )
        return None
