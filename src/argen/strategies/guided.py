"""Guided decoding with a small model (GeDi, Krause et al. 2020; in the spirit of GenARM).

A second causal LM that shares the base model's tokenizer (the *guide*) reads the output so far
behind two control prefixes, a desired one (`positive_prefix`) and an undesired one
(`negative_prefix`). Bayes' rule with equal class priors turns its two next-token distributions into
the probability that the output, extended by each candidate token v, belongs to the desired class:

    L_c(v) = (sum_{j<t} log p_c(x_j | c, x_<j) + log p_c(v | c, x_<t)) / t      (t = output length with v)
    log P(pos | x_<t, v) = log sigmoid(L_pos(v) - L_neg(v))

The division by t is GeDi's length normalisation (its eq. 5 with the scale alpha = 1, since the guide
is not trained as a discriminator). The step adds omega * log P(pos | x_<t, v) to the base model's
logits (equivalently to its log-probabilities: the shift is constant per step), and the usual sampler
(greedy or sampled, with every processor) draws from the result: GeDi's weighted posterior
p_LM(v) * P(pos | v)^omega. Because of the 1/t, a token's pull fades as the output grows, which is why
GeDi's weights are large (omega ~ 20-30; default 20). `rule="genarm"` instead adds
omega * (log p_pos(v) - log p_neg(v)), the token-level log-ratio of the two conditionals used as an
autoregressive reward (GenARM-style; omega ~ 1-3), whose pull does not fade. With omega = 0 the
logits are the base model's exactly, so the output is plain decoding's token for token. The guide's two rows are feeds the Engine runs in the same round as
the base model's (in the same packed pass when the guide is the base model), counted as draft passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from argen.checks import number_option
from argen.errors import InvalidRequestError
from argen.models import LoadedModel
from argen.models.runtime import SegmentOut
from argen.strategies.base import DecodeState, Feed, Start, Step, Strategy, run_all
from argen.strategies.companions import is_companion, unresolved

RULES = ("gedi", "genarm")
PROBE = "The quick brown fox, 42 cafés & naïve résumés!\n"
OMEGA_MAX = 1000.0  # GeDi uses 20-30, GenARM-style 1-3; far beyond, the steering swamps the logits


class GuidePair:
    """The guide reading two sequences (control prefix + output) in lockstep, pending-token convention:
    each cache holds its sequence but the last token. Its passes are feeds on the guide's runtime (the
    Engine runs them beside the base model's; when the guide is the base model itself, in the very
    same packed pass)."""

    def __init__(self, runtime, caches: list, sequences: list[list[int]]) -> None:
        self.runtime, self.caches = runtime, caches
        self.pending = [s[-1] for s in sequences]

    def prefill(self, sequences: list[list[int]], n_scored: int) -> list[Feed]:
        """Feeds of all but each sequence's last token, with logits for the last `n_scored` of them
        (the generated tokens' predictions, for the class scores)."""
        return [
            Feed(
                seq[:-1], list(range(len(seq) - 1)), num_logits=n_scored, cache=cache, runtime=self.runtime, draft=True
            )
            for seq, cache in zip(sequences, self.caches, strict=True)
        ]

    @staticmethod
    def scored(outs: list[SegmentOut], n_scored: int) -> torch.Tensor:
        """The log-probs [2, n_scored, V] the prefill feeds returned."""
        if not n_scored:
            return torch.empty(2, 0, 0)
        return torch.stack([F.log_softmax(o.requested_logits().float(), -1) for o in outs])

    def step(self) -> list[Feed]:
        """Feeds of the pending tokens, whose logits are the next-token predictions."""
        return [
            Feed([t], [c.lengths[0]], num_logits=1, cache=c, runtime=self.runtime, draft=True)
            for t, c in zip(self.pending, self.caches, strict=True)
        ]

    @staticmethod
    def log_probs(outs: list[SegmentOut]) -> torch.Tensor:
        return F.log_softmax(torch.stack([o.requested_logits()[-1] for o in outs]).float(), -1)  # [2, V]


def class_log_prob(sums: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """log P(pos | text) from summed guide log-likelihoods [2, ...] under (pos, neg), length-normalised."""
    return F.logsigmoid((sums[0] - sums[1]) / max(n_tokens, 1))


@dataclass
class GuidedMemo:
    pair: GuidePair  # the guide reading both control prefixes + the output
    sums: torch.Tensor  # [2]: the output's summed log-likelihoods under each prefix


class Guided(Strategy):
    name = "guided"
    exact = False
    companion_options = {"guide_model": "guide"}

    def __init__(
        self,
        guide_model="default",
        omega: float = 20.0,
        positive_prefix: str = "The following text is cheerful and positive:\n",
        negative_prefix: str = "The following text is gloomy and negative:\n",
        rule: str = "gedi",
    ) -> None:
        omega = number_option("omega", omega, 0, OMEGA_MAX, " (0 is plain decoding; GeDi uses about 20)")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
        for label, text in (("positive_prefix", positive_prefix), ("negative_prefix", negative_prefix)):
            if not isinstance(text, str) or not text:
                raise ValueError(f"{label} must be a non-empty string (the guide's control prefix)")
        if not is_companion(guide_model):
            raise ValueError(
                "guide_model must be a model source (e.g. 'default', 'tiny-random@1'), a LoadedModel or a Generator"
            )
        self.guide_model, self.omega = guide_model, omega
        self.positive_prefix, self.negative_prefix = positive_prefix, negative_prefix
        self.rule = rule
        self._guide: LoadedModel | None = None  # resolved by the API or the server: prepare()

    def options(self) -> dict:
        guide = self.guide_model  # a loaded model is recorded by its name
        return super().options() | {"guide_model": guide if isinstance(guide, str) else getattr(guide, "name", "?")}

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self, base, companions: dict | None = None) -> None:
        """Called by the API or the server with the base LoadedModel and the guide they resolved
        (`companions["guide_model"]`, a LoadedModel): check that the two share a tokenizer (same
        vocabulary size, same ids for a probe string)."""
        runtime = base.runtime
        guide = (companions or {}).get("guide_model")
        if not isinstance(guide, LoadedModel):  # a bare runtime has no tokenizer to read the prefixes with
            raise InvalidRequestError(
                "guided decoding needs its guide as a model with a tokenizer (a model source, "
                "a LoadedModel or a Generator), resolved by the API or the server"
            )
        self._guide = guide
        if guide.runtime.info.vocab_size != runtime.info.vocab_size:
            raise InvalidRequestError(
                f"the guide model's vocabulary ({guide.runtime.info.vocab_size}) differs from the base model's "
                f"({runtime.info.vocab_size}); guided decoding needs two models that share a tokenizer"
            )
        probe = [tok(PROBE, add_special_tokens=False)["input_ids"] for tok in (base.tokenizer, guide.tokenizer)]
        if probe[0] != probe[1]:
            raise InvalidRequestError(
                "the guide model's tokenizer splits text differently from the base model's; "
                "guided decoding needs two models that share a tokenizer"
            )

    @property
    def guide(self) -> LoadedModel:
        """The guide model `prepare` was given."""
        if self._guide is None:
            raise unresolved(self.name, "guide_model")
        return self._guide

    def check(self, runtime, prompt_len: int, params) -> None:
        if self._guide is not None:  # else never resolved: start() says so
            self._check_room(min(params.max_new_tokens, runtime.info.max_positions - prompt_len))

    def _check_room(self, new: int) -> None:
        context = self.guide.runtime.info.max_positions
        longest = max(len(ids) for ids in self.control_ids())
        if longest + new > context:
            raise InvalidRequestError(
                f"the guide reads its control prefix ({longest} tokens) before the output ({new} tokens), but its "
                f"context is {context} tokens; shorten positive_prefix / negative_prefix or ask for fewer tokens"
            )

    def control_ids(self) -> list[list[int]]:
        tok = self.guide.tokenizer
        return [
            list(tok(p, add_special_tokens=True)["input_ids"]) for p in (self.positive_prefix, self.negative_prefix)
        ]

    def _sums(self, scored: torch.Tensor, output: list[int]) -> torch.Tensor:
        """Summed log-likelihoods [2] of the output tokens under the two control prefixes."""
        if not output:
            return torch.zeros(2)
        ids = torch.tensor(output, device=scored.device)
        return scored.gather(-1, ids.expand(2, -1)[..., None])[..., 0].sum(-1).cpu()

    def class_log_prob(self, output: list[int]) -> float:
        """The guide's log P(positive | output) for a finished output (call `prepare` first). A
        measurement of a finished text, not a request's step: it runs on the guide directly."""
        runtime = self.guide.runtime
        sequences = [c + list(output) for c in self.control_ids()]
        caches = [runtime.new_cache(1, len(s)) for s in sequences]
        pair = GuidePair(runtime, caches, sequences)
        feeds = pair.prefill(sequences, len(output))
        outs = runtime.forward_packed([f.segment() for f in feeds])
        for cache in caches:
            cache.free()
        return float(class_log_prob(self._sums(pair.scored(outs, len(output)), output), len(output)))

    def start(self, state: DecodeState) -> Start:
        self._check_room(state.max_new_tokens)  # raises if no guide was resolved
        # A counterfactual replay starts with part of the output already there: the guide reads it too.
        output = state.output
        sequences = [c + list(output) for c in self.control_ids()]
        runtime = self.guide.runtime
        room = max(len(s) for s in sequences) + state.max_new_tokens + 2
        pair = GuidePair(runtime, [state.new_cache(runtime, room) for _ in sequences], sequences)
        outs = yield from run_all(pair.prefill(sequences, len(output)))
        sums = self._sums(pair.scored(outs, len(output)), output)
        state.memo = GuidedMemo(pair, sums.to(state.runtime.device))
        state.extras["guided"] = {"class_log_prob": float(class_log_prob(sums, state.n_generated))}

    # -- decoding ------------------------------------------------------------------------------
    def step(self, state: DecodeState) -> Step:
        m = state.memo
        # The base model's pass and the guide's two rows, in the same round.
        outs = yield from run_all([state.feed([state.tokens[-1]], num_logits=1), *m.pair.step()])
        base = outs[0].requested_logits()[-1].float()
        guide = m.pair.log_probs(outs[1:]).to(base.device)  # [2, V]
        index = state.n_generated
        scores = class_log_prob(m.sums[:, None] + guide, index + 1)  # per candidate token
        steer = scores if self.rule == "gedi" else guide[0] - guide[1]
        token = state.sample(base + self.omega * steer, index)
        m.sums = m.sums + guide[:, token]
        m.pair.pending = [token, token]
        state.extras["guided"]["class_log_prob"] = float(scores[token])  # of the output so far
        return [token]
