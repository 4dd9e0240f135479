"""Sampling: a chain of logits processors and one way to draw, Gumbel-max with replayable noise.

The noise for output position t of a request is drawn from a generator seeded by (seed, t), so a
sample can be replayed exactly (counterfactual generation) and speculative sampling can share the
plain sampler's noise. Temperature 0 means greedy: argmax, no noise; so does any temperature below
GREEDY_BELOW, where dividing the logits by it overflows float32 (1e-38 gave every logit -inf and
token 0) and sampling could differ from the argmax only at a near-exact tie.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field

import torch

from argen.checks import finite_number
from argen.constraints import Constraint, grammar_of
from argen.errors import InvalidRequestError
from argen.logprobs import TokenLogprob, check_top, token_logprob

FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
PENALTY_MAX = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
LOGIT_BIAS_MAX = 100.0  # OpenAI's range: -100 bans a token in practice, +100 all but forces it
LOGIT_BIAS_ENTRIES = 1024  # tokens a request may bias
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS, the same rule)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    banned_token_ids: list[int] = field(default_factory=list)
    # token id -> a number in [-100, 100] added to its logit before any other processing but the
    # repetition penalty (OpenAI's logit_bias). Keys may be ints or their decimal strings (JSON's).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # None: no log-probs; k >= 0: each output token's log-prob (see logprobs.py for which
    # distribution) with the k most likely alternatives (k <= 20).
    logprobs: int | None = None
    # Structured output (constraints.py): OpenAI's {"type": "json_object"} or {"type": "json_schema",
    # "json_schema": {"name": ..., "schema": {...}}}, or argen's {"type": "regex", "regex": ...} and
    # {"type": "grammar", "grammar": <Lark>}; `grammar` is short for the last.
    response_format: dict | None = None
    grammar: str | None = None
    # OpenAI's penalties, over the generated tokens only (the prompt's do not count): token j's logit
    # loses count(j) * frequency_penalty + (count(j) > 0) * presence_penalty; each in [-2, 2].
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's: the output also ends at any of these token ids (kept in token_ids; its text is left out
    # unless include_stop_str_in_output); until min_tokens tokens are out, EOS and these ids are
    # banned and stop strings are not looked for.
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    include_stop_str_in_output: bool = False  # the text keeps the stop string (or stop token) that ended it
    skip_special_tokens: bool = True  # the text leaves special tokens out (their ids stay in token_ids)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.logit_bias = checked_logit_bias(self.logit_bias)
        if self.grammar is not None:
            if self.response_format is not None:
                raise InvalidRequestError("give either grammar or response_format, not both")
            self.response_format, self.grammar = {"type": "grammar", "grammar": self.grammar}, None
        grammar_of(self.response_format)  # the checks that need no tokenizer (the Engine does the rest)
        # Numbers must be finite (NaN fails every comparison; infinity would pass some); each check
        # is a function so that a value of the wrong type fails its own check, not with a TypeError.
        temperature, top_p, min_p, penalty, presence, frequency = (
            finite_number(getattr(self, f)) for f in FLOAT_FIELDS
        )
        checks = [
            (
                lambda: _integer(self.max_new_tokens) and self.max_new_tokens >= 0,
                "max_new_tokens must be an integer >= 0 (0: score the prompt only)",
            ),
            (
                lambda: temperature is not None and temperature >= 0,
                f"temperature must be a finite number >= 0 (0, or below {GREEDY_BELOW:g}, means greedy)",
            ),
            (lambda: _integer(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 turns it off)"),
            (lambda: top_p is not None and 0 < top_p <= 1, "top_p must be a number in (0, 1]"),
            (lambda: min_p is not None and 0 <= min_p < 1, "min_p must be a number in [0, 1)"),
            (
                lambda: penalty is not None and penalty > 0,
                "repetition_penalty must be a finite number > 0 (1 turns it off)",
            ),
            (lambda: self.seed is None or (_integer(self.seed) and self.seed >= 0), "seed must be an integer >= 0"),
            (
                lambda: isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
                "stop must be a list of non-empty strings",
            ),
            (
                lambda: presence is not None and -PENALTY_MAX <= presence <= PENALTY_MAX,
                f"presence_penalty must be a number in [-{PENALTY_MAX:g}, {PENALTY_MAX:g}] (0 turns it off)",
            ),
            (
                lambda: frequency is not None and -PENALTY_MAX <= frequency <= PENALTY_MAX,
                f"frequency_penalty must be a number in [-{PENALTY_MAX:g}, {PENALTY_MAX:g}] (0 turns it off)",
            ),
            (
                lambda: (
                    isinstance(self.stop_token_ids, list) and all(_integer(t) and t >= 0 for t in self.stop_token_ids)
                ),
                "stop_token_ids must be a list of token ids (integers >= 0)",
            ),
            (
                lambda: _integer(self.min_tokens) and 0 <= self.min_tokens <= self.max_new_tokens,
                "min_tokens must be an integer in [0, max_new_tokens]",
            ),
            (
                lambda: self.min_tokens == 0 or self.response_format is None,
                "min_tokens cannot be combined with a response_format: the grammar decides where the output ends",
            ),
            (
                lambda: all(
                    isinstance(getattr(self, f), bool) for f in ("include_stop_str_in_output", "skip_special_tokens")
                ),
                "include_stop_str_in_output and skip_special_tokens must be true or false",
            ),
        ]
        for ok, message in checks:
            if not ok():
                raise InvalidRequestError(f"invalid sampling parameter: {message}")
        check_top(self.logprobs, "invalid sampling parameter: logprobs")
        if self.seed is None:
            # A concrete seed is always recorded, so any sampled output can be replayed.
            self.seed = random.SystemRandom().randrange(2**31)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def as_dict(self) -> dict:
        return asdict(self)


def checked_logit_bias(bias) -> dict[int, float]:
    """`bias` as {token id: float}, or an InvalidRequestError saying what is wrong with it."""
    if not isinstance(bias, dict):
        raise InvalidRequestError("invalid sampling parameter: logit_bias must map token ids to numbers")
    if len(bias) > LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(
            f"invalid sampling parameter: logit_bias may bias at most {LOGIT_BIAS_ENTRIES} tokens; got {len(bias)}"
        )
    out = {}
    for key, value in bias.items():
        # ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses.
        decimal = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12
        token = key if _integer(key) else int(key) if decimal else None
        number = finite_number(value)
        if token is None or token < 0:
            raise InvalidRequestError(
                f"invalid sampling parameter: logit_bias keys must be token ids (integers >= 0); got {str(key)[:20]!r}"
            )
        if number is None or not -LOGIT_BIAS_MAX <= number <= LOGIT_BIAS_MAX:
            raise InvalidRequestError(
                f"invalid sampling parameter: logit_bias values must be numbers in "
                f"[-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}]; token {token} has {str(value)[:20]}"
            )
        out[token] = float(number)
    return out


def apply_repetition_penalty(logits: torch.Tensor, context: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty, as HF applies it: divide positive logits of seen tokens, multiply negative ones."""
    if penalty == 1.0 or not context:
        return logits
    ids = torch.tensor(sorted(set(context)), device=logits.device)
    seen = logits.index_select(-1, ids)
    logits = logits.clone()
    logits.index_copy_(-1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def apply_penalties(logits: torch.Tensor, output: Sequence[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens of `output`: token j's logit loses
    count(j) * frequency + (count(j) > 0) * presence."""
    if not output:
        return logits
    ids, counts = torch.tensor(list(output), dtype=torch.long).unique(return_counts=True)
    return logits.float().index_add(
        -1, ids.to(logits.device), (-(counts * frequency + presence)).float().to(logits.device)
    )


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering (filtered entries become -inf)."""
    logits = logits.float() / params.temperature
    neg_inf = torch.finfo(logits.dtype).min
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; always keep the best one.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), neg_inf)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = params.min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


def entropy(logits: torch.Tensor) -> float:
    """The entropy (nats) of softmax(logits): how unsure a model is of its next token. A masked token
    (logit -inf) has probability 0 and adds nothing; nansum skips its 0 * -inf = nan, which `.sum()`
    would return for the whole row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).nansum())


def position_seed(seed: int, position: int, stream: int = 0) -> int:
    # A fixed mixing of (seed, position, stream): independent-looking streams, stable across runs.
    return (seed * 0x9E3779B1 + position * 0x85EBCA77 + stream * 0xC2B2AE3D) % (2**63 - 1)


def gumbel_noise(seed: int, position: int, size: int, device="cpu", stream: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(position_seed(seed, position, stream))
    u = torch.rand(size, generator=gen, dtype=torch.float64).clamp_(1e-20, 1.0 - 1e-16)
    return (-torch.log(-torch.log(u))).float().to(device)


def uniform(seed: int, position: int, stream: int) -> float:
    gen = torch.Generator().manual_seed(position_seed(seed, position, stream))
    return torch.rand(1, generator=gen, dtype=torch.float64).item()


class Sampler:
    """Turns one row of logits into one token for a request, given the context so far.

    `forced` maps output positions to tokens: an intervention do(x_t = v) of the Gumbel-max structural
    causal model. The token at such a position is v whatever the logits and the noise; every other
    position keeps its own noise, so the rest of the output is the counterfactual one."""

    def __init__(
        self,
        params: SamplingParams,
        forced: dict[int, int] | None = None,
        constraint: Constraint | None = None,
        *,
        prompt_len: int = 0,
        eos_ids: Collection[int] = (),
    ) -> None:
        """`prompt_len`: how many tokens of a context are the prompt (the penalties and min_tokens count
        the rest); `eos_ids`: the ids that end the output, banned with stop_token_ids until min_tokens."""
        self.params = params
        self.forced = dict(forced or {})
        self.constraint = constraint  # the response_format's grammar, if any
        self.prompt_len = prompt_len
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self._ends = torch.tensor(sorted(ends), dtype=torch.long)
        # The fixed parts of `process`, as tensors once per request rather than once per token.
        self._bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        self._bias = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        self._banned = torch.tensor(params.banned_token_ids, dtype=torch.long)
        self.logprobs: dict[int, TokenLogprob] = {}  # output position -> its record (params.logprobs)

    def process(self, logits: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
        """Logits after every processor (float32, filtered to -inf): repetition penalty, presence and
        frequency penalties, logit bias, bans (min_tokens' too), the grammar's mask, then temperature and
        top-k/top-p/min-p unless greedy. A function of (logits, context) alone, so a speculative
        verifier that processes each draft position with its context decides what plain decoding would."""
        p = self.params
        logits = apply_repetition_penalty(logits, context, p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            logits = apply_penalties(logits, context[self.prompt_len :], p.presence_penalty, p.frequency_penalty)
        if len(context) - self.prompt_len < p.min_tokens and len(self._ends):
            logits = logits.float().index_fill(-1, self._ends.to(logits.device), float("-inf"))
        if len(self._bias_ids):
            logits = logits.float().index_add(-1, self._bias_ids.to(logits.device), self._bias.to(logits.device))
        if len(self._banned):
            logits = logits.float().index_fill(-1, self._banned.to(logits.device), float("-inf"))
        if self.constraint is not None:
            logits = self.constraint.apply(logits, context)
        return logits.float() if p.greedy else filter_logits(logits, p)

    def probs(self, logits: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
        """The distribution the sampler draws from (one-hot at the argmax when greedy)."""
        processed = self.process(logits, context)
        if self.params.greedy:
            return torch.nn.functional.one_hot(processed.argmax(-1), processed.shape[-1]).float()
        return processed.softmax(-1)

    def choose(self, processed: torch.Tensor, position: int) -> int:
        """Draw from already-processed logits at output position `position` (and record its log-prob
        when asked: every strategy decides its tokens here, but the SpecTr rule, which records too)."""
        token = self._draw(processed, position)
        self.record(processed, position, token)
        return token

    def record(self, processed: torch.Tensor, position: int, token: int) -> None:
        """Keep `token`'s log-prob under `processed` for output position `position` (a later decision
        for the same position replaces it), if the request asked for log-probs."""
        if self.params.logprobs is not None:
            self.logprobs[position] = token_logprob(processed, token, self.params.logprobs)

    def _draw(self, processed: torch.Tensor, position: int) -> int:
        if position in self.forced:
            return self.forced[position]
        if self.params.greedy:
            return int(processed.argmax(-1))
        noise = gumbel_noise(self.seed, position, processed.shape[-1], processed.device)
        return int((processed + noise).argmax(-1))

    @property
    def seed(self) -> int:
        """The seed of the noise (sampled requests: SamplingParams.validate() drew one if none was given)."""
        assert self.params.seed is not None, "a sampled request's seed is drawn by SamplingParams.validate()"
        return self.params.seed

    def sample(self, logits: torch.Tensor, context: Sequence[int], position: int) -> int:
        return self.choose(self.process(logits, context), position)
