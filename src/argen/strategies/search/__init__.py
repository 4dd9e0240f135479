"""Search strategies: they change what is generated (not exact), deterministic, greedy only."""

from argen.strategies.search.beam import Beam, ConditionalBeam
from argen.strategies.search.contrastive import Contrastive

__all__ = ["Beam", "ConditionalBeam", "Contrastive"]
