"""Exact speculative and parallel decoding: proposers + one shared verifier."""

from argen.strategies.speculative.base import Speculative
from argen.strategies.speculative.draft_head import DraftHead
from argen.strategies.speculative.draft_model import DraftModel
from argen.strategies.speculative.jacobi import Jacobi
from argen.strategies.speculative.layer_skip import LayerSkip
from argen.strategies.speculative.ngram import NGram
from argen.strategies.speculative.prompt_lookup import PromptLookup
from argen.strategies.speculative.tree import DraftTree

__all__ = ["DraftHead", "DraftModel", "DraftTree", "Jacobi", "LayerSkip", "NGram", "PromptLookup", "Speculative"]
