"""The Python API: `argen.load(...)` returns a Generator with `generate` and `stream`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from argen.cache.press import make_press
from argen.counterfactual import check_interventions, counterfactual
from argen.engine import Engine, Event, Request, Result
from argen.errors import ArgenError, InvalidRequestError
from argen.images import ImageGenerator, is_image_model, load_image_model
from argen.models import LoadedModel, load_model, shared_model
from argen.prompt_edit import PromptEdit
from argen.recipes.caad_store import load_store
from argen.recipes.draft_head import load_draft_head
from argen.recipes.small_model import META_FILE as SMALL_META
from argen.recipes.small_model import load_small_model
from argen.recipes.token_ngrams import local_ngrams
from argen.sampling import SamplingParams
from argen.setprompt import PromptLayout, SetPrompt, is_set_prompt, set_prompt_layout
from argen.strategies import Strategy, make_strategy

SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


class Generator:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.name = model.name
        self.quant = model.quant
        self.runtime = model.runtime
        self.tokenizer = model.tokenizer
        self.engine = Engine(model.runtime, model.tokenizer, model.eos_ids)

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = True) -> list[int]:
        """Token ids fed to the model for a prompt: a string, a list of chat messages, ids, or a SetPrompt
        (whose positions and mask `encode_layout` gives)."""
        if is_set_prompt(prompt):
            return self.encode_layout(prompt, chat).ids
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return list(prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt) and prompt:
            return self._chat_ids(prompt)
        if not isinstance(prompt, str):
            raise InvalidRequestError(
                f"a prompt is a string, a list of chat messages or a list of token ids; got {type(prompt).__name__}"
            )
        if chat:
            return self._chat_ids([{"role": "user", "content": prompt}])
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def encode_layout(self, prompt, chat: bool = True) -> PromptLayout:
        """Ids plus, for a set prompt (a SetPrompt or its JSON dict form), positions and attention mask."""
        if is_set_prompt(prompt):
            sp = prompt if isinstance(prompt, SetPrompt) else SetPrompt.from_json(prompt)
            return set_prompt_layout(self.tokenizer, sp, chat)
        return PromptLayout(self.encode(prompt, chat))

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        return self.encode_chat(messages)

    def encode_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict | None = None,
    ) -> list[int]:
        """Token ids of a conversation through the model's chat template (`chat_text`, then `chat_ids`)."""
        return self.chat_ids(
            self.chat_text(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                template_kwargs=template_kwargs,
            )
        )

    def chat_text(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict | None = None,
    ) -> str:
        """The chat template applied to `messages`: the text `encode_chat` tokenizes (a server checks its
        length before that work). `add_generation_prompt` opens the assistant's turn;
        `continue_final_message` leaves the last message (an assistant's, partial) open so the output
        continues it; `template_kwargs`: more variables for the template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(f"model {self.name!r} has no chat template; pass chat=False (--no-chat)")
        if add_generation_prompt and continue_final_message:
            raise InvalidRequestError(
                "continue_final_message continues the last message; it cannot also open a new "
                "turn (set add_generation_prompt to false)"
            )
        text = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **(template_kwargs or {}),
        )
        return cast(str, text)  # tokenize=False: the template's text (transformers types every return shape)

    def chat_ids(self, text: str) -> list[int]:
        """Token ids of a templated conversation (`chat_text`): the template wrote the special tokens,
        so none are added (as transformers' `apply_chat_template(tokenize=True)` does)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _requests(
        self,
        prompts: list,
        chat: bool,
        strategy,
        options: dict,
        intervene=None,
        n: int | None = None,
        prompt_logprobs: int | None = None,
        press=None,
        edit=None,
        cache_prompt: bool = False,
    ) -> list[Request]:
        unknown = sorted(set(options) - SAMPLING_FIELDS)
        if unknown:
            raise InvalidRequestError(
                f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(SAMPLING_FIELDS))}"
            )
        forced = check_interventions(intervene, None, self.runtime.info.vocab_size) if intervene else None
        requests = []
        edit_of = None
        if edit is not None:
            if len(prompts) != 1:
                raise InvalidRequestError("an edit applies to one previous prompt; give one prompt")
            edit_of = self.encode(prompts[0], chat)
            prompts = [PromptEdit.of(edit).apply(prompts[0])]
        for prompt in prompts:
            params = SamplingParams(**options)
            layout = self.encode_layout(prompt, chat)
            made = self.prepare_strategy(strategy)
            requests.append(
                Request(
                    layout.ids,
                    params,
                    made,
                    layout.positions,
                    layout.mask,
                    forced=forced,
                    n=1 if n is None else n,
                    prompt_logprobs=prompt_logprobs,
                    press=make_press(press),
                    edit_of=edit_of,
                    cache_prompt=cache_prompt,
                )
            )
        return requests

    def prepare_strategy(self, spec) -> Strategy:
        """The strategy of a spec (a name, a dict, a Strategy), its companion models resolved (a draft
        or guide model given as a source is loaded here, once per process) and handed to it."""
        made = make_strategy(spec)
        made.prepare(self.model, companion_models(made, self.model))
        return made

    @staticmethod
    def _as_batch(prompt) -> tuple[list, bool]:
        single = isinstance(prompt, (str, SetPrompt, dict)) or (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(x, (int, dict)) and not is_set_prompt(x) for x in prompt)
        )
        if single:
            return [prompt], False
        if isinstance(prompt, (list, tuple)) and prompt:
            return list(prompt), True
        raise InvalidRequestError("give a prompt string or a non-empty list of prompts")

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompt,
        *,
        strategy="plain",
        chat: bool = True,
        intervene: dict[int, int] | None = None,
        n: int | None = None,
        prompt_logprobs: int | None = None,
        press=None,
        edit=None,
        cache_prompt: bool = False,
        **options,
    ) -> Result | list[Result] | list[list[Result]]:
        """Generate for one prompt (returns a Result) or a list of prompts (returns a list).
        Options are SamplingParams fields: max_new_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, seed, stop, stop_token_ids, min_tokens,
        include_stop_str_in_output, skip_special_tokens, ignore_eos, logit_bias, logprobs (each output
        token's log-prob with that many alternatives: `Result.logprobs`). `prompt_logprobs=k` scores the prompt
        (`Result.prompt_logprobs`; with max_new_tokens=0 nothing is generated). `intervene` ({output position: token id}) forces
        those tokens, every other position keeping its seeded noise: the counterfactual, generated
        from scratch (`counterfactual` gets the same output from a Result, decoding only after t).
        `n`: samples of each prompt, the prompt prefilled once; given (even n=1), each prompt's Result
        becomes a list of n Results (a list of lists for a list of prompts). Sample i has seed
        `seed + i` (`Result.seed`), so `generate(prompt, seed=result.seed)` replays it alone. Greedy
        decoding gives n identical samples. `press`: a KV-cache press (a name, or a dict with "name" and
        its options, e.g. {"name": "kvmerger", "budget": 0.5}; see cache/press.py) that compresses the
        cache to a fraction of the positions, after the prefill and as the output grows.
        `edit` (a `PromptEdit` or {"start", "end", "text"}): generate for `prompt` edited (characters
        [start, end) replaced by text; token ids for a prompt of ids), reusing `prompt`'s cached keys
        after the edit, rotated to their new positions, instead of computing them (PIE; lossy, see
        cache/pie.py): `prompt` must have run before with `cache_prompt=True` (else the edited prompt is
        prefilled in full and `Result.stats.edit_fallback` says why). `cache_prompt`: register this
        prompt's blocks in the runtime's prefix cache for a later edit."""
        prompts, batched = self._as_batch(prompt)
        requests = self._requests(
            prompts, chat, strategy, options, intervene, n, prompt_logprobs, press, edit, cache_prompt
        )
        results = self.engine.run(requests)
        if n is not None:
            grouped = [[r for r in results if r.index == i] for i in range(len(prompts))]
            return grouped if batched else grouped[0]
        return results if batched else results[0]

    def counterfactual(self, result: Result, intervene: dict[int, int] | None = None, **overrides) -> Result:
        """`result` regenerated under do(x_t = v) for each {t: v} in `intervene`, with the same noise at
        every other position (Gumbel-max SCM); no intervention reproduces `result`. See counterfactual.py."""
        return counterfactual(self, result, intervene, **overrides)

    def stream(
        self,
        prompt,
        *,
        strategy="plain",
        chat: bool = True,
        intervene: dict[int, int] | None = None,
        n: int | None = None,
        prompt_logprobs: int | None = None,
        press=None,
        edit=None,
        cache_prompt: bool = False,
        **options,
    ) -> Stream:
        """Events (token ids and text delta) for one prompt as they are generated; the last one
        has a finish_reason, and the returned Stream's `.result` holds the Result afterwards. With
        `n`, the n samples' Events come interleaved, each with its `sample_index` (each sample ends
        with its own finish_reason), and `.result` is the list of n Results."""
        prompts, batched = self._as_batch(prompt)
        if batched:
            raise InvalidRequestError("stream() takes one prompt; call it once per prompt")
        requests = self._requests(
            prompts, chat, strategy, options, intervene, n, prompt_logprobs, press, edit, cache_prompt
        )
        return Stream(self.engine.stream(requests), n is not None)


class Stream:
    """Iterates over a request's Events; `.result` is set once the last one has been read (the list
    of the n Results, by sample index, when `n` was given)."""

    def __init__(self, items: Iterator[Event | Result], samples: bool = False) -> None:
        self._items, self._samples = items, samples
        self.result: Result | list[Result] | None = None

    def __iter__(self) -> Iterator[Event]:
        results = []
        for item in self._items:
            if isinstance(item, Event):
                yield item
            else:
                results.append(item)
        results.sort(key=lambda r: r.sample_index)
        self.result = results if self._samples else results[0] if results else None

    def close(self) -> None:
        """Stop generating (an abandoned stream's sequence leaves the decode loop at once)."""
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


def load(
    model: str = "default", *, runtime: str = "auto", device: str = "cpu", dtype="float32", quant: str = "auto"
) -> Generator | ImageGenerator:
    """Load a model: "default" (bundled SmolLM2-135M-Instruct), a Hugging Face directory, a .gguf
    file, or "tiny-random" / "tiny-random-gpt2" (tiny random models for tests). `quant` picks how
    the native runtime holds the weights on CPU: "auto" (a GGUF's own quantized blocks when argen's
    kernels build here, else fp32), "exact" (the GGUF's blocks, fp32 activations), "none" (fp32,
    dequantized), or "q8_0" / "q4_1" / "q4_0" (quantize fp32 weights at load).
    "digits-ar" / "digits-diffusion" load image-token models trained here on first use: they return an
    `argen.images.ImageGenerator` (`generate_images(labels=[...], strategy=..., seed=...)`)."""
    if is_image_model(model):
        return load_image_model(model)
    return Generator(load_model(model, runtime=runtime, device=device, dtype=dtype, quant=quant))


@dataclass(frozen=True)
class ModelSpec:
    """Which model `load` loads, and how: what the command line's model options say, and what travels
    (pickled) to a Ray worker or replica, which loads the model itself."""

    source: str = "default"
    runtime: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    quant: str = "auto"

    def load(self) -> Generator | ImageGenerator:
        return load(self.source, runtime=self.runtime, device=self.device, dtype=self.dtype, quant=self.quant)

    def load_text(self) -> Generator:
        """`load` for what takes a text model (chat, serve, batch, distill, the bench): an image model is
        refused before anything is loaded (it has no tokenizer, no chat, no OpenAI endpoints)."""
        if is_image_model(self.source):
            raise ArgenError(
                f"{self.source!r} is an image model: draw it with `argen generate --model {self.source} --labels ...`;"
                " this command takes a text model"
            )
        return cast(Generator, self.load())  # a text model: an image one was refused above


def companion_models(strategy: Strategy, base: LoadedModel) -> dict[str, object]:
    """Each of the strategy's `companion_options` resolved to a model, above the strategies: a source
    is loaded once per process (`shared_model`) on the base model's device; a Generator gives its
    LoadedModel; a LoadedModel or a runtime is taken as it is."""
    runtime, found = base.runtime, {}
    for option, kind in type(strategy).companion_options.items():
        value = vars(strategy).get(option)
        if kind == "head":  # a draft head distilled from the base model: cached, a file, or loaded already
            value = load_draft_head(runtime, value, base.name)
        elif kind == "store":  # a CAAD grounding store built from the base model: a file, or loaded already
            value = None if value is None else load_store(runtime, value)
        elif isinstance(value, Generator):
            value = value.model
        elif kind == "small" and (
            value is None or isinstance(value, str)
        ):  # distilled from the base model, or a source
            value = small_model(runtime, value, base.name)
        elif isinstance(value, str):
            # A guide in the base model's dtype; a draft in shared_model's float32 (as before this moved here).
            dtype = runtime.dtype if kind == "guide" else "float32"
            value = shared_model(value, device=str(runtime.device), dtype=dtype)
        found[option] = value
    return found | token_ngrams(strategy, base)


def small_model(runtime, source, model_name: str) -> LoadedModel:
    """The small model of strategies bild and fs-gen: None or "cached" is the one `argen distill-small`
    cached for the model of `runtime`, a directory it made is loaded as it loads them (on the large
    model's weight path, its origin checked), any other source as a draft model is."""
    if source is None or source == "cached" or (isinstance(source, str) and Path(source, SMALL_META).is_file()):
        return load_small_model(runtime, source, model_name)
    return shared_model(source, device=str(runtime.device), dtype=runtime.dtype)


def token_ngrams(strategy: Strategy, base: LoadedModel, build: bool = True) -> dict[str, object]:
    """{"ngrams": the n-gram tables of this machine's text} for a strategy that interpolates with them
    (superposed decoding; recipes/token_ngrams.py), else {}; not loaded when its ngram_weight is 0.
    `build`: build them now if the cache lacks them (minutes, once); a server passes False and gets {}."""
    if not type(strategy).needs_token_ngrams or not vars(strategy).get("ngram_weight"):
        return {}
    tables = local_ngrams(base.tokenizer, base.runtime.info.vocab_size, build)
    return {} if tables is None else {"ngrams": tables}
