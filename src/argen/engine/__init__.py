"""The Engine layer: requests in, token events and results out, through one decode loop.

- `request.py`: Request, Stats, Event, Result, Failure
- `sequence.py`: one request's state, prefill progress and bookkeeping (text, stop conditions)
- `batch.py`: DecodeBatch, the one loop (rounds of packed forward passes, chunked prefill)
- `engine.py`: Engine (checks a request once; generate / stream over a DecodeBatch)
"""

from argen.engine.batch import DecodeBatch
from argen.engine.engine import Engine
from argen.engine.request import Event, Failure, Request, Result, Stats

__all__ = ["DecodeBatch", "Engine", "Event", "Failure", "Request", "Result", "Stats"]
