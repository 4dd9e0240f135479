from argen.models.loading import LoadedModel, load_model, shared_model
from argen.models.runtime import ModelInfo, ModelRuntime, Plan

__all__ = ["LoadedModel", "ModelInfo", "ModelRuntime", "Plan", "load_model", "shared_model"]
