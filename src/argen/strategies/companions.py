"""The second model a strategy may take (a draft model, a guide): the forms an option may give it in.

A strategy never loads one: the API (`Generator.prepare_strategy`) and the server
(server/companions.py) resolve each of its `companion_options` before a request starts, and hand
the strategy the model in `prepare(base, companions)`. Here are only the forms an option accepts,
so that a strategy can refuse a wrong one when it is made.
"""

from __future__ import annotations

from argen.errors import InvalidRequestError
from argen.models import LoadedModel, ModelRuntime
from argen.models.hf import HFRuntime
from argen.models.llama import LlamaRuntime


def is_companion(obj) -> bool:
    """Whether `obj` names or holds a model: a source string, a LoadedModel, a runtime, or an object
    holding a LoadedModel as `.model` (the API's Generator, named by what it holds: the strategies
    sit below the API and never import it)."""
    return isinstance(obj, str | LoadedModel | LlamaRuntime | HFRuntime) or isinstance(
        getattr(obj, "model", None), LoadedModel
    )


def companion_runtime(model) -> ModelRuntime:
    """The runtime of a resolved companion (a LoadedModel, or a runtime given as it is)."""
    return model.runtime if isinstance(model, LoadedModel) else model


def unresolved(strategy: str, option: str) -> Exception:
    """A strategy started before its companion model was resolved (made by hand, not through the API)."""
    return InvalidRequestError(
        f"strategy {strategy!r} runs its {option} model beside the base model, but it was never given one: make "
        f"it with Generator.prepare_strategy (generate, stream and the server do), which loads {option}"
    )
