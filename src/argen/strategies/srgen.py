"""`srgen`: self-reflective generation at test time (Mu et al. 2025, "Self-Reflective Generation at
Test Time", arXiv 2510.02919).

Each step runs the model on the pending token as plain decoding does. Where the next-token entropy
(of the model's own logits, in nats) exceeds `entropy_threshold`, the step pauses to fit a
correction vector δ [H] to the final hidden state before sampling:

    logits(h) = W (h + δ) + b          (the vocabulary projection, W [V, H])
    loss(δ)   = mean_j CE(logits(h_j), x_{j+1})  +  entropy_weight · H(softmax(logits(h_t)))

over the last `prefix_window` context tokens j (prompt included) with their own final hidden states h_j and
the tokens x_{j+1} that followed them, and the pending token's h_t. The cross-entropy term keeps δ
consistent with what the context already says (the "reflection" on the prefix); the entropy term
sharpens the uncertain decision. `steps` Adam steps (from δ = 0, learning rate `lr`) on δ alone, then
the token is sampled from logits(h_t + δ) through the request's sampler (temperature, top-p, greedy
as usual). Lossy.

Which form, and why:
- Where δ goes. The runtimes return the final hidden states *after* the final norm (SegmentOut.hidden;
  models/llama.py's last rms_norm, HF's `hidden_states[-1]`), and the head reads them as they are, so
  δ is added there and the logits are W (h + δ) + b: no norm between δ and the head. That makes the
  head linear in δ, so for every row logits_j(δ) = logits_j(0) + W δ: the rows' logits at δ = 0 are
  computed once per trigger ((W+1) head rows, one GEMM) and each step costs one GEMV forward (W δ) and
  one backward (Wᵀ g) plus a softmax over the window's rows: no backpropagation through the
  transformer, and not (W+1) head rows per step either.
- The loss is the paper's hybrid of a context cross-entropy and entropy minimisation; its weighting
  here is CE + λ·entropy (the paper's (1-λ)·CE + λ·entropy is the same up to a scale of the learning
  rate under plain gradient descent; under Adam, which is scale-free, only the ratio λ matters).
- The trigger is a fixed threshold in nats, not the paper's dynamic one (mean + k·std of recent
  entropies): a fixed one is checkable by hand (the tests compare the fired positions with the plain
  entropies) and its sweep in benchmarks/srgen/ says where it fires.
- δ is reset to 0 at every trigger (the paper trains a vector per identified token): a carried δ
  would make a token depend on every earlier trigger's optimisation, and a reset keeps each trigger
  deterministic given the context (no randomness anywhere: fixed init, Adam, fixed step count).
- The head in float32. On the default model the vocabulary projection is a Q8_0 block-quantized
  matrix tied to the token embedding (models/llama.py), which autograd cannot differentiate; the
  first srgen request dequantizes it once into a float32 copy kept with the runtime (RuntimeMemo:
  113 MB for SmolLM2's 49,152 x 576). Plain steps still use the runtime's own head; a trigger's logits
  come from the float copy.

Cost, bounded per request: a trigger costs one (prefix_window + 1)-row head GEMM plus `steps` x (two
head GEMVs + a (prefix_window + 1) x V softmax forward and backward), at most one per token and
`max_triggers` per sequence. On the default model, one core (benchmarks/srgen/report.md): about
0.15 s a trigger at the defaults, 0.45 s at the server's default caps (prefix_window 64, steps 8),
4.7 s at the options' bounds (256, 16); memory: (prefix_window + 1) x V floats a few times over
while a trigger runs (about 200 MB at 256 rows), nothing kept after it.

Determinism: δ starts at 0, Adam has no randomness, and a trigger reads only its own sequence's
hidden states, so a request's output does not depend on what shares its batch where the runtime's
hidden states do not (the default model's fused kernels). The float32 GEMMs run on torch's
threads; on this machine 1 and 2 threads gave bitwise equal corrected logits, which MKL does not
promise in general.

Records (`Result.extras["srgen"]`): the output positions where it fired, the entropy there, the
optimisation time per trigger, and the loss before and after.

Per request: the last `prefix_window` final hidden states of the sequence (the prompt's from the prefill,
`needs_prompt_hidden`, so srgen prompts are not served from the prefix cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from argen.checks import number_option
from argen.errors import InvalidRequestError
from argen.sampling import entropy
from argen.strategies.base import DecodeState, Start, Step, Strategy, run

MAX_STEPS = 16
MAX_WINDOW = 256
MAX_TRIGGERS = 4096


@dataclass
class FloatHead:
    """The vocabulary projection as float32 tensors autograd can use (made outside inference mode, so
    they can be saved for backward): `weight` [V, H], `bias` [V] or None."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def head_weights(runtime) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The runtime's vocabulary projection (W [V, H], b) as float32 tensors, or None if it is not a
    linear layer this module can read."""
    lm_head = getattr(runtime, "lm_head", None)  # the native Llama runtime: a Matmul or a QuantMatmul
    if lm_head is not None:
        weight = lm_head.dequantize() if hasattr(lm_head, "dequantize") else getattr(lm_head, "weight", None)
        bias = getattr(lm_head, "bias", None)
    else:  # the Hugging Face adapter
        model = getattr(runtime, "model", None)
        out = model.get_output_embeddings() if model is not None else None
        if not isinstance(out, torch.nn.Linear):
            return None
        weight, bias = out.weight, out.bias
    if not isinstance(weight, torch.Tensor):
        return None
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 as a tensor autograd may save (a copy if it is an inference tensor)."""
    t = t.detach().float()
    return t.clone() if t.is_inference() else t


def float_head(runtime) -> FloatHead:
    """The runtime's float32 head, made once and kept with the runtime (shared by its requests)."""
    head = runtime.memo.get(FloatHead)
    if head.weight is None:
        # Out of inference mode, so these are ordinary tensors autograd may save for backward (an
        # inference tensor, e.g. one made while the engine decodes, is copied out of it).
        with torch.inference_mode(False):
            found = head_weights(runtime)
            if found is None:
                raise InvalidRequestError(
                    "strategy 'srgen' needs a model whose vocabulary projection is a linear layer"
                )
            weight, bias = found
            head.weight = _ordinary(weight)
            head.bias = None if bias is None else _ordinary(bias)
    return head


@dataclass
class Reflection:
    """One trigger's optimisation: the corrected next-token logits and the loss before and after."""

    logits: torch.Tensor  # [V]
    loss_before: float
    loss_after: float


def reflection_loss(
    base: torch.Tensor, shift: torch.Tensor, targets: torch.Tensor, entropy_weight: float
) -> torch.Tensor:
    """loss(δ) from the rows' logits at δ = 0 (`base` [k + 1, V]: k context rows, then the pending
    token's) and W δ (`shift` [V]): mean CE of the context rows against `targets` [k], plus
    entropy_weight x the entropy of the last row."""
    logits = base + shift
    log_p = F.log_softmax(logits, dim=-1)
    entropy = -(log_p[-1].exp() * log_p[-1]).sum()
    k = len(targets)
    ce = F.nll_loss(log_p[:k], targets) if k else logits.new_zeros(())
    return ce + entropy_weight * entropy


def reflect(
    head: FloatHead,
    context: torch.Tensor,
    targets: list[int],
    hidden: torch.Tensor,
    *,
    steps: int,
    lr: float,
    entropy_weight: float,
) -> Reflection:
    """Fit δ by `steps` Adam steps from 0 on the context's hidden states `context` [k, H] (each
    followed by `targets[j]`) and the pending token's `hidden` [H]; the logits of hidden + δ."""
    assert head.weight is not None  # float_head made it
    with torch.inference_mode(False), torch.enable_grad():
        weight = head.weight
        rows = torch.cat([context.float(), hidden.float()[None]]).clone()  # out of inference mode
        with torch.no_grad():
            base = F.linear(rows, weight, head.bias)  # [k + 1, V]: the logits at δ = 0
        target_ids = torch.tensor(targets, dtype=torch.long)
        delta = torch.zeros(weight.shape[1], requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=lr)
        loss_before = None
        for _ in range(steps):
            optimizer.zero_grad()
            loss = reflection_loss(base, F.linear(delta, weight), target_ids, entropy_weight)
            if loss_before is None:
                loss_before = float(loss.detach())
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            shift = F.linear(delta, weight)
            loss_after = float(reflection_loss(base, shift, target_ids, entropy_weight))
            logits = base[-1] + shift
    return Reflection(logits.detach(), loss_after if loss_before is None else loss_before, loss_after)


@dataclass
class SRGenMemo:
    context: torch.Tensor  # [k <= window, H]: final hidden states of the tokens before the pending one
    record: dict = field(default_factory=dict)  # state.extras["srgen"]


class SRGen(Strategy):
    name = "srgen"
    exact = False
    needs_prompt_hidden = True

    def __init__(
        self,
        entropy_threshold: float = 2.0,
        steps: int = 3,
        lr: float = 0.02,
        prefix_window: int = 32,
        entropy_weight: float = 0.05,
        max_triggers: int = 256,
    ) -> None:
        self.entropy_threshold = number_option("entropy_threshold", entropy_threshold, 0, 1e6, " (nats)")
        for option, value, high in (("steps", steps, MAX_STEPS), ("prefix_window", prefix_window, MAX_WINDOW)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
                raise ValueError(f"{option} must be an integer between 0 and {high}; got {value!r}")
        if not isinstance(max_triggers, int) or isinstance(max_triggers, bool) or not 0 <= max_triggers <= MAX_TRIGGERS:
            raise ValueError(f"max_triggers must be an integer between 0 and {MAX_TRIGGERS}; got {max_triggers!r}")
        self.steps = steps
        self.lr = number_option("lr", lr, 0, 10, " (Adam's learning rate)")
        self.prefix_window = prefix_window
        self.entropy_weight = number_option("entropy_weight", entropy_weight, 0, 100)
        self.max_triggers = max_triggers

    def check(self, runtime, prompt_len: int, params) -> None:
        if self.steps and self.max_triggers:
            float_head(runtime)  # refuses a runtime without a linear head before any work

    def start(self, state: DecodeState) -> Start | None:
        hidden = state.prompt_hidden
        width = state.runtime.info.hidden_size
        context = (
            torch.zeros(0, width)
            if hidden is None or self.prefix_window == 0
            else hidden[-self.prefix_window :].float()
        )
        record: dict = {"positions": [], "entropy": [], "ms": [], "loss_before": [], "loss_after": [], "triggers": 0}
        state.extras["srgen"] = record
        state.memo = SRGenMemo(context, record)
        return None

    def step(self, state: DecodeState) -> Step:
        m: SRGenMemo = state.memo
        out = yield from run(state.feed([state.tokens[-1]], num_logits=1))
        logits = out.requested_logits()[-1]
        hidden = out.hidden[-1]
        index = state.n_generated
        if self.steps and m.record["triggers"] < self.max_triggers:
            spread = entropy(logits)
            if spread > self.entropy_threshold:
                k = len(m.context)
                targets = state.tokens[len(state.tokens) - k :] if k else []
                began = time.perf_counter()
                found = reflect(
                    float_head(state.runtime),
                    m.context,
                    targets,
                    hidden,
                    steps=self.steps,
                    lr=self.lr,
                    entropy_weight=self.entropy_weight,
                )
                r = m.record
                r["ms"].append(1000 * (time.perf_counter() - began))
                r["positions"].append(index)
                r["entropy"].append(spread)
                r["loss_before"].append(found.loss_before)
                r["loss_after"].append(found.loss_after)
                r["triggers"] += 1
                logits = found.logits
        if self.prefix_window:
            m.context = torch.cat([m.context, hidden.float()[None]])[-self.prefix_window :]
        return [state.sample(logits, index)]
