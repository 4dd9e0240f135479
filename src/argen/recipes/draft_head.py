"""`argen distill-draft`: an EAGLE-style draft head (models/draft_head.py) learned from the model
itself, by self-distillation, and cached beside the model.

1. Data. Prompts of the kinds chat models get are built from text on this machine
   (recipes/local_text.py), and the target answers them: greedy mostly, sampled for a share, in
   batches through the Engine (one packed pass a round for all of them). A recording strategy keeps
   every final hidden state the target computes on the way (the prefill's and each step's), so the
   features cost no extra pass. The responses are the target's own trajectories, the distribution
   the head must learn (EAGLE, Medusa-2).
2. The vocabulary subset (FR-Spec): the tokens of that data ranked by frequency (ties by token id,
   which for a BPE vocabulary follows merge order); the head scores the first `vocab` of them.
3. Training. Entry i reads (f_i, t_{i+1}) and is scored on the response tokens against the target's
   next-token distribution restricted to the subset (cross-entropy to softmax(lm_head(f_{i+1}))),
   plus EAGLE's regression of the feature itself (smooth L1 to f_{i+1}), for each of `unroll` steps
   where step s reads the head's own step s - 1 predictions (EAGLE-3's training-time test), so that
   drafts s - 1 deep see at training what they see when drafting. AdamW, warmup then cosine decay.

Everything is seeded (`Recipe.seed`); the head is saved under the argen cache directory as
`draft-heads/<model fingerprint>-<recipe key>.safetensors`, the key a hash of every recipe setting.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from argen.errors import ArgenError
from argen.models.draft_head import DraftHeadRuntime, HeadConfig, HeadWeights, head_rows_dense, read_head, save_head
from argen.models.llama import LlamaRuntime
from argen.models.sources import cache_dir
from argen.recipes.cached import Artifact, find_cached, forget_loaded, run_meta
from argen.recipes.local_text import build_prompts, local_corpus
from argen.strategies.base import DecodeState, Step, run
from argen.strategies.plain import Plain
from argen.strategies.speculative.skip_calibration import fingerprint

HELD_OUT = 20  # every 20th sequence is held out to measure the head's agreement with the target


@dataclass
class LoadedHeads:
    """The draft heads loaded for a runtime (its memo's record): head file -> its runtime, so every
    request on that model shares one copy."""

    by_path: dict[str, DraftHeadRuntime] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """Every setting that changes the head (the cache key hashes them all)."""

    seed: int = field(
        default=0, metadata={"help": "seeds the prompts, the sampled responses, the initialisation and the batch order"}
    )
    prompts: int = field(default=512, metadata={"help": "prompts the target answers (the training sequences)"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per response"})
    sampled: float = field(
        default=0.25, metadata={"help": "share of responses sampled at `temperature` (the rest greedy)"}
    )
    temperature: float = field(default=0.8, metadata={"help": "temperature of the sampled responses"})
    vocab: int = field(
        default=8192, metadata={"help": "tokens the head scores (FR-Spec: the most frequent in the data)"}
    )
    epochs: int = field(default=6, metadata={"help": "passes over the training sequences"})
    unroll: int = field(
        default=3, metadata={"help": "training-time test steps (step s reads the head's own predictions)"}
    )
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW, warmup then cosine)"})
    batch_tokens: int = field(default=512, metadata={"help": "tokens per training batch"})
    intermediate: int = field(default=0, metadata={"help": "the head's FFN width (0: the target's)"})
    reg_weight: float = field(
        default=0.1, metadata={"help": "weight of the feature regression beside the cross-entropy"}
    )
    init: str = field(
        default="random", metadata={"help": "random, or last-layer: the head's layer starts as the target's last"}
    )

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def check(self) -> None:
        positive = ("prompts", "max_new_tokens", "vocab", "epochs", "unroll", "batch_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgenError(f"recipe setting {name} must be an integer >= 1; got {value!r}")
        if not 0 <= self.sampled <= 1 or not self.temperature > 0 or not self.lr > 0 or self.reg_weight < 0:
            raise ArgenError("recipe settings: sampled must be in [0, 1], temperature and lr > 0, reg_weight >= 0")
        if self.intermediate < 0:
            raise ArgenError("recipe setting intermediate must be >= 0 (0: the target's FFN width)")
        if self.init not in ("random", "last-layer"):
            raise ArgenError(f"recipe setting init must be random or last-layer; got {self.init!r}")


RECIPE_FIELDS = [f for f in fields(Recipe)]


# -- where heads live --------------------------------------------------------------------------
def head_path(runtime, recipe: Recipe) -> Path:
    return cache_dir() / "draft-heads" / f"{fingerprint(runtime)}-{recipe.key()}.safetensors"


def cached_heads(runtime) -> list[Path]:
    """Every head cached for this model (any recipe)."""
    return sorted((cache_dir() / "draft-heads").glob(f"{fingerprint(runtime)}-*.safetensors"))


HEAD = Artifact(
    "draft head",
    "heads",
    "draft head file",
    "pass head=PATH",
    "argen distill-draft",
    "over half an hour on 2 cores",
    present=Path.is_file,
    exists=Path.is_file,
)


def load_draft_head(runtime, source=None, model_name: str = "the model") -> DraftHeadRuntime:
    """The draft head for `runtime`: `source` None or "cached" is the head `argen distill-draft` cached
    for this model with the default recipe (or the only one cached for it); a path is a head file.
    Loaded once per runtime (its memo). A head distilled from other weights is refused."""
    if isinstance(source, DraftHeadRuntime):
        return source
    path = find_cached(source, head_path(runtime, Recipe()), lambda: cached_heads(runtime), HEAD, model_name)
    key = str(path.resolve())
    loaded = runtime.memo.get(LoadedHeads).by_path
    if key not in loaded:
        weights, vocab, meta = read_head(path)
        if meta.get("fingerprint") != fingerprint(runtime):
            raise ArgenError(
                f"the draft head {path.name} was distilled from another model ({meta.get('model')!r}, "
                f"fingerprint {meta.get('fingerprint')}), not {model_name} ({fingerprint(runtime)}); "
                f"run `argen distill-draft --model {model_name}`"
            )
        loaded[key] = DraftHeadRuntime(weights, vocab, runtime, meta | {"path": key})
    return loaded[key]


# -- 1. data -----------------------------------------------------------------------------------
class Recorder(Plain):
    """Plain decoding that keeps every final hidden state the target computes: the prompt's (from
    the prefill) and each step's. They are the features the head learns from (`extras["features"]`)."""

    needs_prompt_hidden = True

    def start(self, state: DecodeState) -> None:
        state.extras["features"] = [state.prompt_hidden]

    def step(self, state: DecodeState) -> Step:
        out = yield from run(state.feed([state.tokens[-1]], num_logits=1))
        state.extras["features"].append(out.hidden)
        return [state.sample(out.requested_logits()[-1], state.n_generated)]


@dataclass
class Example:
    ids: list[int]  # prompt + response
    prompt_len: int
    features: torch.Tensor  # [len(ids) - 1, H]: the target's final hidden state of every token but the last
    kind: str = ""


def is_sampled(i: int, share: float) -> bool:
    """Whether prompt i gets a sampled response: evenly spread, `share` of them."""
    return math.floor((i + 1) * share) > math.floor(i * share)


def data_path(runtime, encoded: list[list[int]], recipe: Recipe) -> Path:
    """Where the data for these prompt ids and generation settings is kept (the features as fp16)."""
    generation = [recipe.seed, recipe.max_new_tokens, recipe.sampled, recipe.temperature]
    digest = hashlib.sha1(json.dumps([encoded, generation]).encode()).hexdigest()[:12]
    return cache_dir() / "draft-data" / f"{fingerprint(runtime)}-{digest}.pt"


def generate_data(
    gen, prompts: list[tuple[str, str]], recipe: Recipe, batch: int = 32, progress: bool = True, cache: bool = False
) -> list[Example]:
    """The target's responses to `prompts`, `batch` of them decoding together through the Engine
    (similar prompt lengths together), with every feature recorded. With `cache`, the data is kept
    under the cache directory (`draft-data/`, deletable), so that training the same model again with
    other training settings skips the generation."""
    from tqdm import tqdm

    encoded = [gen.encode(prompt) for _, prompt in prompts]
    store = data_path(gen.runtime, encoded, recipe) if cache else None
    if store is not None and store.is_file():
        return [Example(ids, n, features.float(), kind) for ids, n, features, kind in torch.load(store)]
    examples: dict[int, Example] = {}  # by prompt: the greedy ones first, then the sampled ones
    bar = tqdm(
        total=len(prompts), desc="distill-draft: target answers", unit="prompt", disable=not progress, file=sys.stderr
    )
    for sampled in (False, True):
        chosen = [i for i in range(len(prompts)) if is_sampled(i, recipe.sampled) == sampled]
        chosen.sort(key=lambda i: (len(encoded[i]), i))
        for start in range(0, len(chosen), batch):
            group = chosen[start : start + batch]
            options = {"temperature": recipe.temperature, "seed": recipe.seed + start} if sampled else {}
            results = gen.generate(
                [encoded[i] for i in group], strategy=Recorder(), max_new_tokens=recipe.max_new_tokens, **options
            )
            for i, result in zip(group, results, strict=True):
                features = torch.cat(result.extras["features"])
                examples[i] = Example(
                    list(result.prompt_ids) + list(result.token_ids), len(result.prompt_ids), features, prompts[i][0]
                )
            bar.update(len(group))
    bar.close()
    ordered = [examples[i] for i in range(len(prompts))]  # every prompt is greedy or sampled
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        partial = store.with_name(store.name + ".partial")
        torch.save([(e.ids, e.prompt_len, e.features.half(), e.kind) for e in ordered], partial)
        partial.replace(store)
    return ordered


def ranked_vocab(examples: list[Example], vocab_size: int) -> torch.Tensor:
    """Every token id ranked by its count in the data (prompts and responses), ties by id."""
    counts = Counter(t for e in examples for t in e.ids)
    order = sorted(range(vocab_size), key=lambda t: (-counts.get(t, 0), t))
    return torch.tensor(order, dtype=torch.long)


# -- 2. training -------------------------------------------------------------------------------
@dataclass
class Batch:
    tokens: torch.Tensor  # [B, n] t_{i+1}
    inputs: torch.Tensor  # [B, n, H] f_i
    targets: torch.Tensor  # [B, n, H] f_{i+1} (zero where there is none)
    scored: torch.Tensor  # [B, n] bool: entry i predicts a response token and f_{i+1} exists


def make_batch(examples: list[Example]) -> Batch:
    n = max(len(e.ids) for e in examples) - 1
    hidden = examples[0].features.shape[-1]
    tokens = torch.zeros(len(examples), n, dtype=torch.long)
    inputs = torch.zeros(len(examples), n, hidden)
    targets = torch.zeros(len(examples), n, hidden)
    scored = torch.zeros(len(examples), n, dtype=torch.bool)
    for b, e in enumerate(examples):
        length = len(e.ids)
        tokens[b, : length - 1] = torch.tensor(e.ids[1:])
        inputs[b, : length - 1] = e.features
        targets[b, : length - 2] = e.features[1:]
        scored[b, max(0, e.prompt_len - 2) : length - 2] = True
    return Batch(tokens, inputs, targets, scored)


def batches(examples: list[Example], batch_tokens: int) -> list[list[Example]]:
    """Examples of similar lengths together, at most `batch_tokens` tokens (padded) a batch."""
    ordered = sorted(examples, key=lambda e: len(e.ids))
    out: list[list[Example]] = []
    current: list[Example] = []
    for e in ordered:
        if current and len(e.ids) * (len(current) + 1) > batch_tokens:
            out.append(current)
            current = []
        current.append(e)
    if current:
        out.append(current)
    return out


@dataclass
class Trainer:
    """The frozen parts of the target a head is trained against, and the loss."""

    target: LlamaRuntime
    vocab: torch.Tensor  # the subset's token ids, ranked
    unroll: int
    reg_weight: float
    lm_rows: torch.Tensor = field(init=False)  # [S, H] the target's LM head on the subset

    def __post_init__(self) -> None:
        self.lm_rows = head_rows_dense(self.target, self.vocab)

    def loss(self, weights: HeadWeights, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy to the target's subset distribution plus `reg_weight` x the feature regression,
        summed over the unrolled steps; also each step's top-1 agreement with the target."""
        n = batch.tokens.shape[1]
        with torch.no_grad():
            emb = self.target.embed_tokens(batch.tokens).float()
            want_scored = (batch.targets[batch.scored] @ self.lm_rows.T).log_softmax(-1)  # [scored, S]
        cos, sin = self.target.cos[:n], self.target.sin[:n]
        scored_rows = batch.scored.any(1)
        first_scored = int(batch.scored[scored_rows].float().argmax(1).min()) if scored_rows.any() else 0
        outs = weights.unrolled(emb, batch.inputs, cos, sin, self.unroll, max(0, first_scored - self.unroll))
        total = torch.zeros(())
        metrics: dict[str, float] = {}
        for step, out in enumerate(outs, start=1):
            scored = batch.scored.clone()
            scored[:, : step - 1] = False  # entry i of step s needs i - s + 1 >= 0
            if not scored.any():
                continue
            got = (out[scored] @ self.lm_rows.T).log_softmax(-1)
            target = want_scored[scored[batch.scored]]
            ce = -(target.exp() * got).sum(-1).mean()
            reg = F.smooth_l1_loss(out[scored], batch.targets[scored])
            total = total + ce + self.reg_weight * reg
            metrics[f"ce{step}"] = ce.item()
            metrics[f"top1_{step}"] = (got.argmax(-1) == target.argmax(-1)).float().mean().item()
        metrics["loss"] = total.item()
        return total, metrics

    def evaluate(self, weights: HeadWeights, examples: list[Example], batch_tokens: int) -> dict[str, float]:
        """Mean metrics over `examples` (weighted by batch), no gradient."""
        sums: Counter = Counter()
        count = 0
        with torch.no_grad():
            for group in batches(examples, batch_tokens):
                _, metrics = self.loss(weights, make_batch(group))
                sums.update(metrics)
                count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}


def schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def new_head(target, recipe: Recipe) -> HeadWeights:
    generator = torch.Generator().manual_seed(recipe.seed)
    config = HeadConfig.like(target, recipe.intermediate or None)
    layer = target.layers[-1] if recipe.init == "last-layer" else None
    if layer is not None and config != HeadConfig.like(target):
        raise ArgenError(
            "init last-layer copies the target's last layer, so the head must have its shape (intermediate 0)"
        )
    return HeadWeights(config).reset(generator, target.norm, layer)


def train(
    trainer: Trainer, weights: HeadWeights, examples: list[Example], recipe: Recipe, progress: bool = True
) -> list[dict[str, float]]:
    """`recipe.epochs` passes over `examples` in a seeded order; returns the metrics of each epoch."""
    from tqdm import tqdm

    groups = batches(examples, recipe.batch_tokens)
    total = recipe.epochs * len(groups)
    optimizer = torch.optim.AdamW(weights.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.Generator().manual_seed(recipe.seed + 1)
    log = []
    bar = tqdm(total=total, desc="distill-draft: training", unit="batch", disable=not progress, file=sys.stderr)
    step = 0
    weights.train()
    for _ in range(recipe.epochs):
        sums: Counter = Counter()
        for index in torch.randperm(len(groups), generator=order).tolist():
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * schedule(step, total, max(1, total // 20))
            loss, metrics = trainer.loss(weights, make_batch(groups[index]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights.parameters(), 1.0)
            optimizer.step()
            sums.update(metrics)
            step += 1
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", top1=f"{metrics.get('top1_1', 0):.2f}")
            bar.update()
        log.append({k: v / len(groups) for k, v in sums.items()})
    bar.close()
    weights.eval()
    return log


# -- the whole recipe ----------------------------------------------------------------------------
def distill(
    gen, recipe: Recipe = Recipe(), batch: int = 32, progress: bool = True, path: Path | None = None, corpus=None
) -> Path:
    """Run the recipe on `gen`'s model and save the head (to the cache, unless `path`); returns where."""
    recipe.check()
    runtime = gen.runtime
    if not isinstance(runtime, LlamaRuntime):
        raise ArgenError("argen distill-draft needs the model on argen's native runtime (Llama-family models)")
    started, cpu_started = time.perf_counter(), time.process_time()
    corpus = corpus if corpus is not None else local_corpus()
    prompts = build_prompts(corpus, recipe.prompts, recipe.seed)
    examples = generate_data(gen, prompts, recipe, batch, progress, cache=path is None)
    data_seconds = time.perf_counter() - started
    vocab = ranked_vocab(examples, runtime.info.vocab_size)[: min(recipe.vocab, runtime.info.vocab_size)]
    response = [t for e in examples for t in e.ids[e.prompt_len :]]
    covered = torch.isin(torch.tensor(response), vocab).float().mean().item() if response else 0.0
    held_out = examples[::HELD_OUT] if len(examples) >= 2 * HELD_OUT else []
    training = [e for i, e in enumerate(examples) if not (held_out and i % HELD_OUT == 0)]
    trainer = Trainer(runtime, vocab, recipe.unroll, recipe.reg_weight)
    weights = new_head(runtime, recipe)
    log = train(trainer, weights, training, recipe, progress)
    evaluation = trainer.evaluate(weights, held_out, recipe.batch_tokens) if held_out else {}
    run = run_meta(started, cpu_started)
    meta = {
        "model": gen.name,
        "fingerprint": fingerprint(runtime),
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "sequences": len(examples),
        "tokens": sum(len(e.ids) for e in examples),
        "response_tokens": len(response),
        "vocab_coverage": covered,
        "epochs": log,
        "held_out": evaluation,
        "data_seconds": data_seconds,
        "train_seconds": run["seconds"] - data_seconds,
        **run,
    }
    out = path or head_path(runtime, recipe)
    save_head(out, weights, vocab, meta)
    forget_loaded(runtime.memo.get(LoadedHeads).by_path, out)
    return out
