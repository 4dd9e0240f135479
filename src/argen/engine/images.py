"""Image requests in the one decode loop.

An `ImageRequest` waits in the Scheduler's line beside the text `Request`s and is admitted by the same
rule (scheduler.py `Scheduler.take`): first come, first served, its images counted as rows against the
sequence cap (`n`, as a text request's samples), no KV blocks (the image decoders keep their own small
state). Once admitted, the DecodeBatch (batch.py) runs every `ImageBatch` one step a round, after the
text sequences' packed pass: text and images take turns pass by pass, and neither waits for the
other to finish.

Requests admitted in the same round for the same model, strategy and options join one `ImageBatch`:
different clients' images are decoded as rows of one batch. That is sound because every image draws
from its own generator, seeded from (its request's seed, its index in the request)
(images/decoding.py): its pixels do not depend on what shares its batch. A batch takes no rows once it
has started (a decoder's state is per batch: the AR pixel it is at, a block model's current block, a
VAR model's scale), so a later request starts a batch of its own, which runs beside it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import cast

import torch

from argen.images import ImageGenerator
from argen.images.decoding import Decoded, Steps, row_generators
from argen.images.generator import ImageResult


@dataclass(eq=False)
class ImageRequest:
    """Images of one request: one per label, decoded by `generator`'s model with `strategy` (a name or a
    dict with its options), under `seed` (None: a random one, reported in the result)."""

    generator: ImageGenerator
    labels: list[int]
    strategy: object = "plain"
    seed: int | None = None
    name: str = field(default="", init=False)
    options: dict = field(default_factory=dict, init=False)
    checked: torch.Tensor | None = field(default=None, init=False, repr=False)

    def check(self) -> None:
        """Every check the request gets (InvalidRequestError says what is wrong), before it waits in line,
        so that a bad request never fails the others of its batch; the seed is chosen here if none was."""
        self.checked, self.name, self.options = self.generator.check_request(self.labels, self.strategy, self.seed)
        if self.seed is None:
            self.seed = secrets.randbelow(2**31)

    @property
    def n(self) -> int:
        """Rows: what the Scheduler's sequence cap (the server's --max-batch) counts."""
        return len(self.labels)

    def key(self) -> tuple:
        """Requests with equal keys may share a batch: the same model, strategy and options."""
        return (id(self.generator), self.name, tuple(sorted(self.options.items())))


@dataclass
class ImagesDone:
    """A finished image request (the batch's counterpart of a text Result): its images, and the rows of
    the batch they were decoded in (its own and the other requests')."""

    index: int
    result: ImageResult
    batch_rows: int


class ImageBatch:
    """Rows of image requests with one key, decoded together: `step` runs one forward pass (the first one
    starts the decode with every member's rows) and returns the members' ImagesDone when it ends."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.members: list[tuple[int, ImageRequest]] = []
        self.steps: Steps | None = None
        self.passes = 0  # steps run so far
        self.started = 0.0

    @property
    def rows(self) -> int:
        return sum(request.n for _, request in self.members)

    def add(self, index: int, request: ImageRequest) -> None:
        if self.steps is not None:
            raise RuntimeError("an image batch takes no rows once it has started")
        self.members.append((index, request))

    def drop(self, indices: set[int]) -> None:
        """Cancelled requests leave a batch that has not started; a started one decodes their rows to the
        end (the decoder's state is the batch's) and their results are not sent."""
        if self.steps is None:
            self.members = [(i, r) for i, r in self.members if i not in indices]

    def step(self) -> list[ImagesDone]:
        try:
            steps = self.steps if self.steps is not None else self._start()
            next(steps)  # one pass; the last one ends the decode, in the same round
            self.passes += 1
            return []
        except StopIteration as end:
            self.passes += 1
            return self._done(end.value)

    def _start(self) -> Steps:
        """Start the decode of every member's rows, up to its first pass (a decode yields before each)."""
        requests = [r for _, r in self.members]
        assert all(r.checked is not None and r.seed is not None for r in requests)  # checked in line
        labels = torch.cat([cast(torch.Tensor, r.checked) for r in requests])
        gens = [g for r in requests for g in row_generators(cast(int, r.seed), r.n)]
        first = requests[0]
        self.started = time.perf_counter()
        self.steps = steps = first.generator.decode(first.name, first.options, labels, gens)
        next(steps)
        return steps

    def _done(self, decoded: Decoded) -> list[ImagesDone]:
        seconds, rows, start = time.perf_counter() - self.started, self.rows, 0
        done = []
        for index, request in self.members:
            assert request.checked is not None and request.seed is not None  # checked before admission
            part = decoded.rows(start, start + request.n)
            start += request.n
            result = request.generator.result(
                [part], request.checked, seconds, request.seed, request.name, request.options
            )
            done.append(ImagesDone(index, result, rows))
        return done
