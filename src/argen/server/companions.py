"""Companion models over HTTP: the operator's choice, not the client's.

`draft-model` and `guided` take a second model (option `draft`, `guide_model`). The Python API and
the CLI take a model source there (a path, `default`, `tiny-random@1`), loading it on first use.
A server must not: a source would let any client make it read any model file on its disk, run a
download, fill memory, and probe the filesystem through the error messages. So `argen serve`
loads the draft and guide models it is given at start (`--draft-model NAME=SOURCE`,
`--guide-model NAME=SOURCE`), and a request names one of them; the served model itself is
available under its id. Any other value is a 400 that names the choices and echoes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from argen.api import Generator
from argen.errors import ArgenError
from argen.models import LoadedModel, shared_model
from argen.server.errors import bad_request

FLAGS = {"draft": "--draft-model", "guide": "--guide-model"}


@dataclass
class Companions:
    served_id: str
    served: LoadedModel
    models: dict[str, dict[str, LoadedModel]] = field(default_factory=lambda: {"draft": {}, "guide": {}})

    @classmethod
    def load(cls, gen: Generator, served_id: str, drafts: list[str] = (), guides: list[str] = ()) -> Companions:
        """Load every `NAME=SOURCE` (once per canonical source, on the base model's device and dtype)."""
        found = cls(served_id, gen.model)
        runtime = gen.runtime
        for kind, pairs in (("draft", drafts), ("guide", guides)):
            for pair in pairs:
                name, sep, source = (part.strip() for part in pair.partition("="))
                if not sep or not name or not source:
                    raise ArgenError(f"{FLAGS[kind]} takes NAME=SOURCE (e.g. small=path/to/model); got {pair!r}")
                if name == served_id or name in found.models[kind]:
                    raise ArgenError(f"{FLAGS[kind]} {pair!r}: the name {name!r} is taken; give each model its own")
                model = shared_model(source, device=str(runtime.device), dtype=runtime.dtype)
                if model.runtime.info.vocab_size != runtime.info.vocab_size:
                    raise ArgenError(
                        f"{FLAGS[kind]} {pair!r}: its vocabulary ({model.runtime.info.vocab_size} tokens) differs "
                        f"from the served model's ({runtime.info.vocab_size}); use a model with the same tokenizer"
                    )
                found.models[kind][name] = model
        return found

    def names(self, kind: str) -> list[str]:
        return list(self.models[kind]) + [self.served_id]

    def resolve(self, strategy_cls, options: dict) -> dict:
        """`options` with every companion name replaced by its loaded model; a 400 for anything else
        (a source, a name not served, a number), which echoes nothing of what was sent."""
        options = dict(options)
        for option, kind in strategy_cls.companion_options.items():
            if option not in options and kind == "guide":
                options[option] = next(iter(self.models[kind]), self.served_id)  # the first guide, else itself
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
            options[option] = self.served if value == self.served_id else self.models[kind][value]
        return options
