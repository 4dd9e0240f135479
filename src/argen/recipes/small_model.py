"""`argen distill-small`: a small model with the model's own tokenizer, made from the model itself.

No second checkpoint of the default model's family is on this machine, and methods that pair a
small and a large model (BiLD, FS-GEN) need one with the same vocabulary. So the small model is
the large one cut short and taught to finish early:

1. Cut. The large model's embedding, its first `layers` decoder layers, its final norm and its LM
   head (tied to the embedding on SmolLM2): a Hugging Face Llama of `layers` layers whose weights are
   the large model's own. With no training it is exactly the large model with the rest skipped.
2. Self-distillation. The large model reads text that is already on this machine
   (recipes/local_text.py; never the Spec-Bench questions, the bench's test set), packed into
   windows of `seq_len` tokens; its top-`top_k` next-token probabilities at every position are kept
   (cached under `small-model-data/`, so that other training settings skip the teacher). The cut
   model then learns that distribution: the loss is the cross-entropy from the teacher's top-k
   probabilities to the student's full-vocabulary log-softmax (the KL to the teacher restricted to
   its top-k, up to the teacher's constant entropy). Top-k, not the full vocabulary, because the
   full distribution is 49,152 floats a token (200 KB) to keep, and the top 64 hold nearly all of
   the teacher's mass. The embedding and the LM head stay frozen: they are tied, shared with
   the large model's vocabulary, and their gradient would cost as much as the rest of a step. The
   last `train_layers` kept layers (0: all of them) and the final norm learn, with AdamW, warmup
   then cosine decay.

Every setting is part of the cache key (`Recipe.key`); everything is seeded (`Recipe.seed`). The
small model is saved as an ordinary Hugging Face model directory under the argen cache,
`small-models/<large model fingerprint>-<recipe key>/` (config.json, model.safetensors, the
tokenizer files, and `argen-small-model.json` with the large model's fingerprint and the recipe), so
it is also a model source for `load_model(dir)`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from argen.errors import ArgenError
from argen.models.loading import LoadedModel, load_model
from argen.models.quant import QuantMatmul
from argen.models.sources import cache_dir
from argen.recipes.cached import Artifact, find_cached, forget_loaded, run_meta
from argen.strategies.speculative.skip_calibration import fingerprint

META_FILE = "argen-small-model.json"
HELD_OUT = 10  # a text whose hash is 0 mod 10 is never trained on (the held-out NLL reads them)
DOCUMENTED_TIME = "about 9 CPU minutes on one core"  # the default recipe, measured: benchmarks/small_model


@dataclass(frozen=True)
class Recipe:
    """Every setting that changes the small model (the cache key hashes them all)."""

    seed: int = field(default=0, metadata={"help": "seeds the choice of texts and the batch order"})
    layers: int = field(default=8, metadata={"help": "decoder layers kept: the large model's first K"})
    steps: int = field(default=120, metadata={"help": "training steps (0: the plain cut)"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW, warmup then cosine)"})
    sequences: int = field(default=240, metadata={"help": "text windows the large model reads (the training data)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per window"})
    batch: int = field(default=4, metadata={"help": "windows per training step"})
    top_k: int = field(default=64, metadata={"help": "teacher probabilities kept per token (the loss's support)"})
    train_layers: int = field(default=0, metadata={"help": "the last N kept layers learn (0: all of them)"})

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def check(self) -> None:
        for name in ("layers", "sequences", "seq_len", "batch", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgenError(f"recipe setting {name} must be an integer >= 1; got {value!r}")
        for name in ("steps", "train_layers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ArgenError(f"recipe setting {name} must be an integer >= 0; got {value!r}")
        if not self.lr > 0:
            raise ArgenError(f"recipe setting lr must be > 0; got {self.lr!r}")
        if self.train_layers > self.layers:
            raise ArgenError(f"train_layers ({self.train_layers}) cannot exceed layers ({self.layers})")


RECIPE_FIELDS = [f for f in fields(Recipe)]


# -- where small models live -------------------------------------------------------------------
def small_model_path(runtime, recipe: Recipe) -> Path:
    return cache_dir() / "small-models" / f"{fingerprint(runtime)}-{recipe.key()}"


def cached_small_models(runtime) -> list[Path]:
    """Every small model cached for this model (any recipe)."""
    root = cache_dir() / "small-models"
    return sorted(p for p in root.glob(f"{fingerprint(runtime)}-*") if (p / META_FILE).is_file())


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArgenError(
            f"{str(path)!r} is not a small model made by `argen distill-small` (no readable {META_FILE}): {exc}"
        ) from exc


def matching_quant(runtime) -> str:
    """The weight path for the small model: the large model's kind of kernels. A large model on
    quantized blocks (the default: its GGUF's Q4_1 layers, Q8_0 vocabulary matrix, "exact") gets its
    small model's fp32 weights quantized at load to Q8_0, so both run argen's fused quantized forward
    ("-a8" follows too). Not Q4_1: distillation moves the kept layers' weights by less than half a
    Q4_1 step, so re-quantizing them to Q4_1 snaps most of them back onto the large model's grid and
    undoes the training (measured on the default model, 4 windows of docs/strategies.md: NLL 7.95
    in fp32 and in Q8_0, 18.7 in Q4_1, the plain cut's 22.1). A large model on dense weights gets
    dense weights ("none")."""
    layers = getattr(runtime, "layers", None)
    qkv = getattr(layers[0], "qkv", None) if layers else None
    if isinstance(qkv, QuantMatmul):
        return "q8_0" + ("-a8" if qkv.act8 else "")
    return "none"


@dataclass
class LoadedSmallModels:
    """The small models loaded for a runtime (its memo's record): directory -> model, so that every
    request on that model shares one copy."""

    by_path: dict[str, LoadedModel] = field(default_factory=dict)


SMALL = Artifact(
    "small model",
    "small models",
    "small model directory",
    "pass the directory",
    "argen distill-small",
    DOCUMENTED_TIME,
    present=lambda path: (path / META_FILE).is_file(),
    exists=Path.is_dir,
)


def load_small_model(runtime, source=None, model_name: str = "the model") -> LoadedModel:
    """The small model for `runtime`: `source` None or "cached" is the one `argen distill-small`
    cached for this model with the default recipe (or the only one cached for it); a path is a small
    model's directory. Loaded once per runtime (its memo), on the weight path the large model runs
    on (`matching_quant`). A small model made from other weights is refused."""
    if isinstance(source, LoadedModel):
        return source
    path = find_cached(
        source, small_model_path(runtime, Recipe()), lambda: cached_small_models(runtime), SMALL, model_name
    )
    key = str(path.resolve())
    loaded = runtime.memo.get(LoadedSmallModels).by_path
    if key not in loaded:
        meta = read_meta(path)
        if meta.get("fingerprint") != fingerprint(runtime):
            raise ArgenError(
                f"the small model {path.name} was made from another model ({meta.get('model')!r}, "
                f"fingerprint {meta.get('fingerprint')}), not {model_name} ({fingerprint(runtime)}); "
                f"run `argen distill-small --model {model_name}`"
            )
        small = load_model(str(path), device=str(runtime.device), dtype=runtime.dtype, quant=matching_quant(runtime))
        if small.runtime.info.vocab_size != runtime.info.vocab_size:
            raise ArgenError(f"the small model {path.name} has another vocabulary than {model_name}")
        loaded[key] = small
    return loaded[key]


# -- 1. the cut --------------------------------------------------------------------------------
def cut_model(hf_model, layers: int):
    """A new Hugging Face model of the same class: `hf_model`'s embedding, its first `layers` decoder
    layers, its final norm and its LM head (copies; `hf_model` is left as it was)."""
    total = hf_model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ArgenError(f"the model has {total} decoder layers; cannot keep {layers}")
    config = copy.deepcopy(hf_model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:layers]
    small = type(hf_model)(config)
    state = {
        k: v
        for k, v in hf_model.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    missing, unexpected = small.load_state_dict(state, strict=False)
    # A tied LM head is one tensor under two names; anything else left out would be a bug.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"cutting the model left weights unmatched: {missing} {unexpected}")
    if config.tie_word_embeddings:
        small.tie_weights()
    return small.float().eval()


# -- 2. the teacher's data ---------------------------------------------------------------------
def corpus_texts(corpus=None) -> list[str]:
    """The texts the large model reads: documentation paragraphs, function sources with their
    names, and translated sentences, from this machine (recipes/local_text.py)."""
    from argen.recipes.local_text import local_corpus  # reading the machine's files costs seconds

    corpus = corpus if corpus is not None else local_corpus()
    texts = list(corpus.prose)
    texts += [f"# {name}: {doc}\n{source}" for name, doc, source in corpus.functions]
    texts += [sentence for _, sentence in corpus.foreign]
    return texts


def is_held_out(text: str) -> bool:
    """Whether `text` is kept out of training (by its hash: stable whatever else the machine has)."""
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % HELD_OUT == 0


def windows(tokenizer, texts: list[str], n: int, seq_len: int, seed: int, separator: int) -> torch.Tensor:
    """`n` windows [n, seq_len] of token ids: the texts in a seeded order, each followed by
    `separator`, packed end to end and cut every `seq_len` tokens."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    need = n * seq_len
    for text in order:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [separator]
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ArgenError(
            f"the texts give {len(stream)} tokens, fewer than {n} windows of {seq_len}; lower sequences or seq_len"
        )
    return torch.tensor(stream[:need], dtype=torch.long).view(n, seq_len)


def model_logits(runtime, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of whole windows on an argen runtime (its own fast path)."""
    caches = runtime.new_cache(ids.shape[0], ids.shape[1])
    positions = torch.arange(ids.shape[1], device=runtime.device).expand(ids.shape[0], -1)
    with torch.no_grad():
        logits, _ = runtime.forward(ids.to(runtime.device), positions, caches)
    for cache in caches if isinstance(caches, list) else [caches]:
        cache.free()
    return logits.float()


@dataclass
class TeacherData:
    ids: torch.Tensor  # [N, T] windows
    top_ids: torch.Tensor  # [N, T, K] the teacher's top-k next tokens at each position
    top_logprobs: torch.Tensor  # [N, T, K] their log-probabilities (full-vocabulary softmax)


def teacher_path(runtime, ids: torch.Tensor, top_k: int) -> Path:
    digest = hashlib.sha1(ids.numpy().tobytes() + str(top_k).encode()).hexdigest()[:12]
    return cache_dir() / "small-model-data" / f"{fingerprint(runtime)}-{digest}.pt"


def teacher_data(
    runtime, ids: torch.Tensor, top_k: int, batch: int = 8, progress: bool = True, cache: bool = False
) -> TeacherData:
    """The large model's top-k next-token log-probabilities on `ids`, `batch` windows a pass. With
    `cache`, kept under the cache directory (`small-model-data/`, deletable)."""
    from tqdm import tqdm

    store = teacher_path(runtime, ids, top_k) if cache else None
    if store is not None and store.is_file():
        saved = torch.load(store)
        return TeacherData(ids, saved["top_ids"], saved["top_logprobs"].float())
    top_k = min(top_k, runtime.info.vocab_size)
    top_ids = torch.zeros(*ids.shape, top_k, dtype=torch.int32)
    top_logprobs = torch.zeros(*ids.shape, top_k)
    bar = tqdm(
        total=ids.shape[0],
        desc="distill-small: large model reads",
        unit="window",
        disable=not progress,
        file=sys.stderr,
    )
    for start in range(0, ids.shape[0], batch):
        chunk = ids[start : start + batch]
        values, indices = model_logits(runtime, chunk).log_softmax(-1).topk(top_k, dim=-1)
        top_ids[start : start + batch], top_logprobs[start : start + batch] = indices.int(), values
        bar.update(chunk.shape[0])
    bar.close()
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        partial = store.with_name(store.name + ".partial")
        torch.save({"top_ids": top_ids, "top_logprobs": top_logprobs.half()}, partial)
        partial.replace(store)
        top_logprobs = top_logprobs.half().float()  # what a cached run reads: one result either way
    return TeacherData(ids, top_ids, top_logprobs)


# -- 3. training -------------------------------------------------------------------------------
def distill_loss(student, ids: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the cross-entropy from the teacher's top-k probabilities to the
    student's log-softmax: sum_i p_teacher(i) * -log q_student(i) over the teacher's top k."""
    logprobs = student(input_ids=ids).logits.float().log_softmax(-1)
    picked = logprobs.gather(-1, top_ids.long())
    return -(top_logprobs.exp() * picked).sum(-1).mean()


def kl_to_teacher(student, data: TeacherData, batch: int = 8) -> float:
    """Mean over positions of sum_topk p_t (log p_t - log q_s): the KL restricted to the teacher's
    top k (a measurement, no gradient)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, data.ids.shape[0], batch):
            ids = data.ids[start : start + batch]
            ce = distill_loss(
                student, ids, data.top_ids[start : start + batch], data.top_logprobs[start : start + batch]
            )
            p = data.top_logprobs[start : start + batch]
            total += (ce.item() + (p.exp() * p).sum(-1).mean().item()) * ids.shape[0]
            count += ids.shape[0]
    return total / max(count, 1)


def trainable(student, recipe: Recipe) -> list[torch.nn.Parameter]:
    """Freeze the embedding / LM head and the kept layers before the last `train_layers`; return the
    parameters that learn (those layers and the final norm)."""
    first = 0 if recipe.train_layers == 0 else recipe.layers - recipe.train_layers
    for p in student.parameters():
        p.requires_grad_(False)
    learn: list[torch.nn.Parameter] = []
    for i, layer in enumerate(student.model.layers):
        if i >= first:
            learn += list(layer.parameters())
    learn += list(student.model.norm.parameters())
    for p in learn:
        p.requires_grad_(True)
    return learn


def schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(student, data: TeacherData, recipe: Recipe, progress: bool = True) -> list[float]:
    """`recipe.steps` AdamW steps over `data` in a seeded order; returns the loss of each step."""
    from tqdm import tqdm

    params = trainable(student, recipe)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.Generator().manual_seed(recipe.seed + 1)
    n = data.ids.shape[0]
    queue: list[int] = []
    losses: list[float] = []
    student.train()
    bar = tqdm(total=recipe.steps, desc="distill-small: training", unit="step", disable=not progress, file=sys.stderr)
    for step in range(recipe.steps):
        while len(queue) < recipe.batch:  # epochs in fresh seeded orders, batches across their seams
            queue += torch.randperm(n, generator=order).tolist()
        rows, queue = torch.tensor(queue[: recipe.batch]), queue[recipe.batch :]
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * schedule(step, recipe.steps, max(1, recipe.steps // 20))
        loss = distill_loss(student, data.ids[rows], data.top_ids[rows], data.top_logprobs[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update()
    bar.close()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return losses


# -- the whole recipe ----------------------------------------------------------------------------
def save_small_model(student, tokenizer, out: Path, meta: dict) -> None:
    """A Hugging Face model directory plus META_FILE, written beside `out` and moved into place."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    student.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / META_FILE).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)


def distill(
    model: LoadedModel,
    recipe: Recipe = Recipe(),
    progress: bool = True,
    path: Path | None = None,
    corpus=None,
) -> Path:
    """Cut `model` to `recipe.layers` layers, distil it to `model` on local text (or `corpus`, a
    local_text.Corpus), and save it (to the cache, unless `path`); returns the directory."""
    recipe.check()
    runtime = model.runtime
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(recipe.seed)  # nothing here draws from it, but a library might
    loader: Any = model.hf_model_loader  # not .hf_model: the LoadedModel keeps no fp32 copy after this
    student = cut_model(loader(), recipe.layers)
    data = None
    losses: list[float] = []
    kl_before = kl_after = None
    if recipe.steps:
        pool = [t for t in corpus_texts(corpus) if not is_held_out(t)]
        separator = model.tokenizer.eos_token_id if model.tokenizer.eos_token_id is not None else 0
        ids = windows(model.tokenizer, pool, recipe.sequences, recipe.seq_len, recipe.seed, separator)
        data = teacher_data(runtime, ids, recipe.top_k, progress=progress, cache=path is None)
    teacher_seconds = time.perf_counter() - started
    if data is not None:
        probe = TeacherData(data.ids[: recipe.batch], data.top_ids[: recipe.batch], data.top_logprobs[: recipe.batch])
        kl_before = kl_to_teacher(student, probe)
        losses = train(student, data, recipe, progress)
        kl_after = kl_to_teacher(student, probe)
    run = run_meta(started, cpu_started)
    meta = {
        "model": model.name,
        "fingerprint": fingerprint(runtime),
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "large_layers": runtime.info.n_layers,
        "train_tokens": int(data.ids.numel()) if data is not None else 0,
        "losses": [losses[i] for i in range(0, len(losses), max(1, len(losses) // 50))] + losses[-1:],
        "kl_first_batch": {"before": kl_before, "after": kl_after},
        "teacher_seconds": teacher_seconds,
        "train_seconds": run["seconds"] - teacher_seconds,
        **run,
    }
    out = path or small_model_path(runtime, recipe)
    save_small_model(student, model.tokenizer, out, meta)
    forget_loaded(runtime.memo.get(LoadedSmallModels).by_path, out)
    return out
