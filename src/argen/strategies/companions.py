"""The second model a strategy may take (a draft model, a guide), given in Python as a loaded
object rather than a source: which objects count, and what they hold."""

from __future__ import annotations


def loaded_model(obj):
    """The LoadedModel behind a Generator or a LoadedModel; None for anything else."""
    from argen.api import Generator  # (api imports the strategies: resolved when called)
    from argen.models import LoadedModel

    if isinstance(obj, Generator):
        return obj.model
    return obj if isinstance(obj, LoadedModel) else None


def model_runtime(obj):
    """The runtime of a Generator, a LoadedModel or a runtime itself; None for anything else."""
    from argen.models.hf import HFRuntime
    from argen.models.llama import LlamaRuntime

    model = loaded_model(obj)
    if model is not None:
        return model.runtime
    return obj if isinstance(obj, LlamaRuntime | HFRuntime) else None
