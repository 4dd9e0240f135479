"""The Python API: `argen.load(...)` returns a Generator with `generate` and `stream`."""

from __future__ import annotations

from collections.abc import Iterator

from argen.engine import Engine, Event, Request, Result
from argen.errors import InvalidRequestError
from argen.models import LoadedModel, load_model
from argen.sampling import SamplingParams
from argen.strategies import make_strategy

SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


class Generator:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.name = model.name
        self.runtime = model.runtime
        self.tokenizer = model.tokenizer
        self.engine = Engine(model.runtime, model.tokenizer, model.eos_ids)

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = True) -> list[int]:
        """Token ids fed to the model for a prompt: a string, a list of chat messages, or ids."""
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

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(f"model {self.name!r} has no chat template; pass chat=False (--no-chat)")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _requests(self, prompts: list, chat: bool, strategy, options: dict) -> list[Request]:
        unknown = sorted(set(options) - SAMPLING_FIELDS)
        if unknown:
            raise InvalidRequestError(
                f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(SAMPLING_FIELDS))}"
            )
        requests = []
        for prompt in prompts:
            params = SamplingParams(**options)
            requests.append(Request(self.encode(prompt, chat), params, make_strategy(strategy)))
        return requests

    @staticmethod
    def _as_batch(prompt) -> tuple[list, bool]:
        single = isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(x, (int, dict)) for x in prompt)
        )
        if single:
            return [prompt], False
        if isinstance(prompt, (list, tuple)) and prompt:
            return list(prompt), True
        raise InvalidRequestError("give a prompt string or a non-empty list of prompts")

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt, *, strategy="plain", chat: bool = True, **options) -> Result | list[Result]:
        """Generate for one prompt (returns a Result) or a list of prompts (returns a list).
        Options are SamplingParams fields: max_new_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, stop, ignore_eos."""
        prompts, batched = self._as_batch(prompt)
        results = self.engine.run(self._requests(prompts, chat, strategy, options))
        return results if batched else results[0]

    def stream(self, prompt, *, strategy="plain", chat: bool = True, **options) -> Stream:
        """Events (token ids and text delta) for one prompt as they are generated; the last one
        has a finish_reason, and the returned Stream's `.result` holds the Result afterwards."""
        prompts, batched = self._as_batch(prompt)
        if batched:
            raise InvalidRequestError("stream() takes one prompt; call it once per prompt")
        return Stream(self.engine.stream(self._requests(prompts, chat, strategy, options)))


class Stream:
    """Iterates over a request's Events; `.result` is set once the last one has been read."""

    def __init__(self, items: Iterator[Event | Result]) -> None:
        self._items = items
        self.result: Result | None = None

    def __iter__(self) -> Iterator[Event]:
        for item in self._items:
            if isinstance(item, Event):
                yield item
            else:
                self.result = item


def load(model: str = "default", *, runtime: str = "auto", device: str = "cpu", dtype="float32") -> Generator:
    """Load a model: "default" (bundled SmolLM2-135M-Instruct), a Hugging Face directory, a .gguf
    file, or "tiny-random" / "tiny-random-gpt2" (tiny random models for tests)."""
    return Generator(load_model(model, runtime=runtime, device=device, dtype=dtype))
