"""Companion models over HTTP: the operator's choice, not the client's.

`draft-model` and `guided` take a second model (option `draft`, `guide_model`), `draft-head` a
draft head distilled from the served model (option `head`), `caad` a grounding store built from
the served model (option `store`), and `bild` and `fs-gen` a small model with the served model's
tokenizer (option `small`). The Python API and the CLI take a model source or a head or store file
there (a path, `default`, `tiny-random@1`, `cached`), loading it on first use.
A server must not: a source would let any client make it read any model file on its disk, run a
download, fill memory, and probe the filesystem through the error messages. So `argen serve`
loads the draft and guide models, draft heads, stores and small models it is given at start
(`--draft-model NAME=SOURCE`, `--guide-model NAME=SOURCE`, `--draft-head NAME=SOURCE`, `--caad-store
NAME=PATH`, `--small-model NAME=SOURCE`), and a request names one of them; the served model itself
is available under its id as a draft or guide model. Any other value is a 400 that names the
choices and echoes nothing. A request for `draft-head` (`caad`, `bild`, `fs-gen`) that names no head
(store, small model) gets the first one loaded, and a 400 that says so when the server has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from argen.api import Generator, small_model
from argen.errors import ArgenError
from argen.models import LoadedModel, shared_model
from argen.recipes.caad_store import load_store
from argen.recipes.draft_head import load_draft_head
from argen.server.errors import bad_request

FLAGS = {
    "draft": "--draft-model",
    "guide": "--guide-model",
    "head": "--draft-head",
    "store": "--caad-store",
    "small": "--small-model",
}


# Companions only the operator loads (a client never names a source): what a request that needs one
# is told when none is loaded.
OPERATOR_LOADS = {
    "head": "needs a draft head distilled from the served model, and this server has none loaded; its "
    "operator adds one at start with --draft-head NAME=cached (after `argen distill-draft`)",
    "store": "needs a grounding store, and this server has none loaded; its operator adds one at start "
    "with --caad-store NAME=PATH (after `argen caad-store`)",
    "small": "needs a small model with the served model's tokenizer, and this server has none loaded; its "
    "operator adds one at start with --small-model NAME=cached (after `argen distill-small`)",
}


@dataclass
class Companions:
    served_id: str
    served: LoadedModel
    models: dict[str, dict[str, object]] = field(
        default_factory=lambda: {"draft": {}, "guide": {}, "head": {}, "store": {}, "small": {}}
    )

    @classmethod
    def load(
        cls,
        gen: Generator,
        served_id: str,
        drafts: Sequence[str] = (),
        guides: Sequence[str] = (),
        heads: Sequence[str] = (),
        stores: Sequence[str] = (),
        smalls: Sequence[str] = (),
    ) -> Companions:
        """Load every `NAME=SOURCE` (once per canonical source, on the base model's device and dtype; a
        head's SOURCE is `cached`, the head `argen distill-draft` cached for the served model, or a file; a
        small model's `cached`, the one `argen distill-small` cached for it, or any model source)."""
        found = cls(served_id, gen.model)
        runtime = gen.runtime
        kinds = (("draft", drafts), ("guide", guides), ("head", heads), ("store", stores), ("small", smalls))
        for kind, pairs in kinds:
            for pair in pairs:
                name, sep, source = (part.strip() for part in pair.partition("="))
                if not sep or not name or not source:
                    example = {"head": "default=cached", "store": "docs=path/to/store"}.get(kind, "small=path/to/model")
                    raise ArgenError(f"{FLAGS[kind]} takes NAME=SOURCE (e.g. {example}); got {pair!r}")
                if name == served_id or name in found.models[kind]:
                    raise ArgenError(f"{FLAGS[kind]} {pair!r}: the name {name!r} is taken; give each model its own")
                if kind == "head":
                    found.models[kind][name] = load_draft_head(runtime, source, served_id)
                    continue
                if kind == "store":
                    found.models[kind][name] = load_store(runtime, source)
                    continue
                if kind == "small":
                    model = small_model(runtime, source, served_id)
                else:
                    model = shared_model(source, device=str(runtime.device), dtype=runtime.dtype)
                if model.runtime.info.vocab_size != runtime.info.vocab_size:
                    raise ArgenError(
                        f"{FLAGS[kind]} {pair!r}: its vocabulary ({model.runtime.info.vocab_size} tokens) differs "
                        f"from the served model's ({runtime.info.vocab_size}); use a model with the same tokenizer"
                    )
                found.models[kind][name] = model
        return found

    def names(self, kind: str) -> list[str]:
        """What a request may name: the loaded companions of that kind, and the served model itself
        as a draft or guide model (a model is no draft head of itself)."""
        return list(self.models[kind]) + ([self.served_id] if kind in ("draft", "guide") else [])

    def resolve(self, strategy_cls, options: dict) -> dict:
        """`options` with every companion name replaced by its loaded model; a 400 for anything else
        (a source, a name not served, a number), which echoes nothing of what was sent."""
        options = dict(options)
        for option, kind in strategy_cls.companion_options.items():
            if option not in options and kind == "guide":
                options[option] = next(iter(self.models[kind]), self.served_id)  # the first guide, else itself
            if option not in options and kind in OPERATOR_LOADS:
                if not self.models[kind]:
                    raise bad_request(f"strategy {strategy_cls.name!r} {OPERATOR_LOADS[kind]}", "strategy")
                options[option] = next(iter(self.models[kind]))  # the first one loaded
            value = options.get(option)
            choices = ", ".join(repr(n) for n in self.names(kind))
            if not isinstance(value, str) or value not in self.names(kind):
                given = "is missing" if option not in options else "is not one of them"
                raise bad_request(
                    f"option {option} of strategy {strategy_cls.name!r} must name one of this server's {kind} models "
                    f"({choices}); it {given}. Model sources (paths, 'default', ...) are not accepted over HTTP: "
                    f"the operator adds models with {FLAGS[kind]} NAME=SOURCE",
                    "strategy",
                )
            options[option] = (
                self.served if value == self.served_id and kind in ("draft", "guide") else self.models[kind][value]
            )
        return options
