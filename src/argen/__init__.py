"""argen: one engine for autoregressive generation."""

from argen.api import Generator, load
from argen.engine import Event, Result, Stats
from argen.errors import ArgenError, InvalidRequestError, ModelNotFoundError
from argen.prompt_edit import PromptEdit
from argen.sampling import SamplingParams
from argen.setprompt import SetPrompt
from argen.strategies import REGISTRY as STRATEGIES
from argen.strategies import Strategy

__all__ = [
    "STRATEGIES",
    "ArgenError",
    "Event",
    "Generator",
    "InvalidRequestError",
    "ModelNotFoundError",
    "PromptEdit",
    "Result",
    "SamplingParams",
    "SetPrompt",
    "Stats",
    "Strategy",
    "load",
]
__version__ = "0.1.0"
