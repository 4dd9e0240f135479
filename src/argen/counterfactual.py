"""Counterfactual generation with the Gumbel-max structural causal model (Chatzi et al., 2024).

A sampled token is x_t = argmax(processed logits_t + g_t), where the Gumbel noise g_t is drawn from
a generator seeded by (request seed, output position t) (see sampling.py). The noise is therefore a
deterministic function of (seed, t): a Result records it completely by recording the seed, the
sampling parameters, the strategy and the prompt layout (`result.extras["replay"]`, written by the
Engine for every request). Nothing per token needs storing.

A counterfactual answers "what would this output have been had token t been v, all else (the noise)
equal?": do(x_t = v), then every later token is drawn with its original noise under the new context.
The replay prefills prompt + original output[:t] + [v] in one pass (as if already generated, so the
output positions line up with the original's) and then decodes as usual: one prefill plus plain
decoding. With no intervention the replay regenerates from the prompt and reproduces the original.
"""

from __future__ import annotations

from collections.abc import Callable

from argen.engine import Request, Result
from argen.errors import InvalidRequestError
from argen.sampling import SamplingParams
from argen.strategies import Strategy, make_strategy


def check_interventions(intervene: dict, n_tokens: int | None, vocab_size: int) -> dict[int, int]:
    """{output position: token id}, checked; positions must fall inside the output (when known)."""
    checked: dict[int, int] = {}
    for pos, tok in (intervene or {}).items():
        if not isinstance(pos, int) or pos < 0 or (n_tokens is not None and pos >= n_tokens):
            limit = f"0..{n_tokens - 1}" if n_tokens else "within the output"
            raise InvalidRequestError(f"intervention position {pos!r} must be an output position ({limit})")
        if not isinstance(tok, int) or not 0 <= tok < vocab_size:
            raise InvalidRequestError(
                f"intervention token {tok!r} at position {pos} must be a token id in 0..{vocab_size - 1}"
            )
        checked[pos] = tok
    return checked


def counterfactual_request(
    result: Result,
    intervene: dict[int, int] | None,
    vocab_size: int,
    make: Callable[[object], Strategy] = make_strategy,
    **overrides,
) -> Request:
    """The replay as a Request the engine runs; `make` builds its strategy from the recorded spec (the
    API's `prepare_strategy`, which resolves a draft or guide model the record names)."""
    replay = result.extras.get("replay")
    if replay is None:
        raise InvalidRequestError("this Result carries no replay record; counterfactuals need a Result from argen")
    if replay.get("press") is not None and replay["press"]["budget"] < 1:
        # The replay prefills the output prefix in one pass, so a press would compress another cache
        # than the original run's: the replay would not reproduce it.
        raise InvalidRequestError(
            "a counterfactual replays an unpressed cache; this Result was generated with a "
            "KV-cache press below budget 1: generate it again without press"
        )
    strategy = overrides.pop("strategy", replay["strategy"])
    params = SamplingParams(**(replay["params"] | overrides))
    intervene = check_interventions(intervene or {}, len(result.token_ids), vocab_size)
    # Earlier interventions (a counterfactual of a counterfactual) stay in force; all are kept in the
    # record, though the sampler never reaches those inside the replayed prefix.
    forced = dict(replay.get("forced") or {}) | intervene
    prefix: list[int] = []
    if intervene:
        first = min(intervene)
        prefix = list(result.token_ids[:first]) + [intervene[first]]
        if len(prefix) > params.max_new_tokens:
            raise InvalidRequestError(
                f"intervention at position {first} is past max_new_tokens "
                f"({params.max_new_tokens}); raise max_new_tokens"
            )
    return Request(
        list(result.prompt_ids),
        params,
        make(strategy),
        replay.get("prompt_positions"),
        replay.get("prompt_mask"),
        output_prefix=prefix,
        forced=forced or None,
    )


def counterfactual(generator, result: Result, intervene: dict[int, int] | None = None, **overrides) -> Result:
    """The output `result` would have had under do(x_t = v) for each {t: v} in `intervene` (output
    positions, 0-based; token ids), with the same noise at every other position. `overrides` replace
    recorded sampling options (e.g. max_new_tokens) or the strategy (`strategy=...`); changing the
    temperature or the strategy changes the causal model, so the answer is no longer a counterfactual
    of the same model. Cost: one prefill of prompt + output[:t] + [v], then plain decoding."""
    request = counterfactual_request(
        result, intervene, generator.runtime.info.vocab_size, generator.prepare_strategy, **overrides
    )
    return generator.engine.run([request])[0]
