"""Exact speculative and parallel decoding: proposers + one shared verifier."""

from argen.strategies.speculative.base import Speculative
from argen.strategies.speculative.prompt_lookup import PromptLookup
from argen.strategies.speculative.tree import DraftTree

__all__ = ["DraftTree", "PromptLookup", "Speculative"]
