"""The Engine layer: requests in, token events and results out, through one decode loop.

- `request.py`: Request, Stats, Event, Result, Failure
- `sequence.py`: one request's state, prefill progress and bookkeeping (text, stop conditions)
- `scheduler.py`: Scheduler, the one admission (who joins), and each round's plan (chunked prefill)
- `batch.py`: DecodeBatch, the one loop (rounds of packed forward passes: plan -> run -> apply)
- `images.py`: image requests in that loop (ImageRequest, ImageBatch: rows of several requests)
- `engine.py`: Engine (checks a request once; generate / stream through a Scheduler)
"""

from argen.engine.batch import DecodeBatch
from argen.engine.engine import Engine
from argen.engine.images import ImageRequest, ImagesDone
from argen.engine.request import Event, Failure, Request, Result, Stats

__all__ = ["DecodeBatch", "Engine", "Event", "Failure", "ImageRequest", "ImagesDone", "Request", "Result", "Stats"]
