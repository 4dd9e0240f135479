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
logits are the base model's exactly, so the output is plain decoding's token for token. The guide runs one forward pass per step over both rows at once
(a 2-row batch on the native runtime; two passes on the Hugging Face adapter), counted as draft passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from argen.checks import number_option
from argen.errors import InvalidRequestError
from argen.strategies.base import DecodeState, Strategy

RULES = ("gedi", "genarm")
PROBE = "The quick brown fox, 42 cafés & naïve résumés!\n"
OMEGA_MAX = 1000.0  # GeDi uses 20-30, GenARM-style 1-3; far beyond, the steering swamps the logits


def load_guide(source, device="cpu", dtype=torch.float32):
    """A LoadedModel for a guide given as a model source string (loaded once per process and
    device and dtype, `shared_model`), a LoadedModel or a Generator."""
    if not isinstance(source, str):
        return getattr(source, "model", source)  # Generator -> its LoadedModel
    from argen.models import shared_model

    return shared_model(source, device=str(device), dtype=dtype)


class GuidePair:
    """The guide reading two sequences (control prefix + output) in lockstep, pending-token convention:
    each cache holds its sequence but the last token."""

    def __init__(self, runtime, sequences: list[list[int]], room: int, counters) -> None:
        self.runtime, self.counters = runtime, counters
        self.batched = hasattr(runtime, "layers")  # the native runtime decodes rows of unequal length together
        size = max(len(s) for s in sequences) + room
        self.cache = runtime.new_cache(2, size) if self.batched else None
        self.caches = [self.cache.row(i) for i in range(2)] if self.batched else [runtime.new_cache(1, size)
                                                                                  for _ in sequences]  # fmt: skip
        self.pending = [s[-1] for s in sequences]

    def prefill(self, sequences: list[list[int]], n_scored: int) -> torch.Tensor:
        """Feed all but each sequence's last token; return the log-probs [2, n_scored, V] of the last
        `n_scored` tokens of each sequence (those that were generated, for the class scores)."""
        scored = []
        for i, seq in enumerate(sequences):
            logits = None
            if len(seq) > 1:
                ids = torch.tensor([seq[:-1]], device=self.runtime.device)
                positions = torch.arange(len(seq) - 1, device=self.runtime.device)[None]
                logits, _ = self.runtime.forward(ids, positions, self.caches[i], num_logits=n_scored)
                self.counters.draft_passes += 1
            if self.batched:
                self.cache.lengths[i] = self.caches[i].lengths[0]
            if n_scored:
                scored.append(F.log_softmax(logits[0].float(), -1))
        return torch.stack(scored) if scored else torch.empty(2, 0, 0)

    def step(self) -> torch.Tensor:
        """Feed the pending tokens; return the next-token log-probs [2, V]."""
        device = self.runtime.device
        if self.batched:
            ids = torch.tensor([[t] for t in self.pending], device=device)
            positions = torch.tensor([[n] for n in self.cache.lengths], device=device)
            logits, _ = self.runtime.forward(ids, positions, self.cache, num_logits=1)
            self.counters.draft_passes += 1
            return F.log_softmax(logits[:, -1].float(), -1)
        rows = []
        for cache, token in zip(self.caches, self.pending):
            positions = torch.tensor([[cache.lengths[0]]], device=device)
            logits, _ = self.runtime.forward(torch.tensor([[token]], device=device), positions, cache, num_logits=1)
            self.counters.draft_passes += 1
            rows.append(logits[0, -1])
        return F.log_softmax(torch.stack(rows).float(), -1)


def class_log_prob(sums: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """log P(pos | text) from summed guide log-likelihoods [2, ...] under (pos, neg), length-normalised."""
    return F.logsigmoid((sums[0] - sums[1]) / max(n_tokens, 1))


class Guided(Strategy):
    name = "guided"
    exact = False
    companion_options = {"guide_model": "guide"}

    def __init__(self, guide_model="default", omega: float = 20.0,
                 positive_prefix: str = "The following text is cheerful and positive:\n",
                 negative_prefix: str = "The following text is gloomy and negative:\n", rule: str = "gedi") -> None:  # fmt: skip
        omega = number_option("omega", omega, 0, OMEGA_MAX, " (0 is plain decoding; GeDi uses about 20)")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
        for label, text in (("positive_prefix", positive_prefix), ("negative_prefix", negative_prefix)):
            if not isinstance(text, str) or not text:
                raise ValueError(f"{label} must be a non-empty string (the guide's control prefix)")
        if not isinstance(guide_model, str) and not hasattr(guide_model, "runtime") and not hasattr(guide_model, "model"):
            raise ValueError("guide_model must be a model source (e.g. 'default', 'tiny-random@1'), a LoadedModel "
                             "or a Generator")  # fmt: skip
        self.guide_model, self.omega = guide_model, omega
        self.positive_prefix, self.negative_prefix = positive_prefix, negative_prefix
        self.rule = rule
        self._guide = None

    def options(self) -> dict:
        guide = self.guide_model  # a loaded model is recorded by its name
        return super().options() | {"guide_model": guide if isinstance(guide, str) else getattr(guide, "name", "?")}

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self, base) -> None:
        """Called by the Generator with the base LoadedModel: load the guide next to it and check that
        the two share a tokenizer (same vocabulary size, same ids for a probe string)."""
        runtime = base.runtime
        self._guide = load_guide(self.guide_model, runtime.device, runtime.dtype)
        guide = self._guide
        if guide.runtime.info.vocab_size != runtime.info.vocab_size:
            raise InvalidRequestError(
                f"the guide model's vocabulary ({guide.runtime.info.vocab_size}) differs from the base model's "
                f"({runtime.info.vocab_size}); guided decoding needs two models that share a tokenizer"
            )
        probe = [tok(PROBE, add_special_tokens=False)["input_ids"] for tok in (base.tokenizer, guide.tokenizer)]
        if probe[0] != probe[1]:
            raise InvalidRequestError("the guide model's tokenizer splits text differently from the base model's; "
                                      "guided decoding needs two models that share a tokenizer")  # fmt: skip

    def check(self, runtime, prompt_len: int, params) -> None:
        if self._guide is not None:  # else not prepared yet (no Generator): start() checks
            self._check_room(min(params.max_new_tokens, runtime.info.max_positions - prompt_len))

    def _check_room(self, new: int) -> None:
        context = self._guide.runtime.info.max_positions
        longest = max(len(ids) for ids in self.control_ids())
        if longest + new > context:
            raise InvalidRequestError(
                f"the guide reads its control prefix ({longest} tokens) before the output ({new} tokens), but its "
                f"context is {context} tokens; shorten positive_prefix / negative_prefix or ask for fewer tokens"
            )

    def control_ids(self) -> list[list[int]]:
        tok = self._guide.tokenizer
        return [list(tok(p, add_special_tokens=True)["input_ids"]) for p in (self.positive_prefix, self.negative_prefix)]

    def _read(self, output: list[int], room: int, counters) -> tuple[GuidePair, torch.Tensor]:
        """The guide reads control prefix + `output` under both classes: the pair, ready to decode, and
        the summed log-likelihoods [2] of the output tokens."""
        sequences = [c + list(output) for c in self.control_ids()]
        pair = GuidePair(self._guide.runtime, sequences, room, counters)
        scored = pair.prefill(sequences, len(output))
        sums = torch.zeros(2)
        if output:
            ids = torch.tensor(output, device=scored.device)
            sums = scored.gather(-1, ids.expand(2, -1)[..., None])[..., 0].sum(-1).cpu()
        return pair, sums

    def class_log_prob(self, output: list[int]) -> float:
        """The guide's log P(positive | output) for a finished output (call `prepare` first)."""
        from argen.strategies.base import StepCounters

        _, sums = self._read(output, 1, StepCounters())
        return float(class_log_prob(sums, len(output)))

    def start(self, state: DecodeState) -> None:
        if self._guide is None:  # used without a Generator: no tokenizer check possible
            self._guide = load_guide(self.guide_model, state.runtime.device, state.runtime.dtype)
            if self._guide.runtime.info.vocab_size != state.runtime.info.vocab_size:
                raise InvalidRequestError("the guide model's vocabulary differs from the base model's")
        self._check_room(state.max_new_tokens)
        # A counterfactual replay starts with part of the output already there: the guide reads it too.
        self._pair, sums = self._read(state.output, state.max_new_tokens + 2, state.counters)
        self._sums = sums.to(state.runtime.device)
        state.extras["guided"] = {"class_log_prob": float(class_log_prob(sums, state.n_generated))}

    # -- decoding ------------------------------------------------------------------------------
    def step(self, state: DecodeState) -> list[int]:
        logits, _ = state.forward([state.tokens[-1]], num_logits=1)
        base = logits[0, -1].float()
        guide = self._pair.step().to(base.device)  # [2, V]
        index = state.n_generated
        scores = class_log_prob(self._sums[:, None] + guide, index + 1)  # per candidate token
        steer = scores if self.rule == "gedi" else guide[0] - guide[1]
        token = state.sample(base + self.omega * steer, index)
        self._sums = self._sums + guide[:, token]
        self._pair.pending = [token, token]
        state.extras["guided"]["class_log_prob"] = float(scores[token])  # of the output so far
        return [token]
