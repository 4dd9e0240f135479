"""The one place that decides who runs: which waiting requests join the decode loop, and which
prefill chunks each round runs.

- Admission (`Scheduler.take`): first come, first served. The head of the queue joins when the
  batch has a slot for each of its n samples (`max_sequences` counts sequences: a request of n
  samples takes n, since each is a row of every pass and a cache of its own) and KV memory for its
  worst case (`DecodeBatch.blocks_needed`); else it and everyone behind it wait. A lone request
  larger than the limits runs by itself rather than never. An image request (images.py) waits in
  the same line and joins by the same rule: its images are its rows (`n`), it needs no KV blocks.
  `generate` / `stream` (engine.py), the
  server (server/scheduler.py: its thread, queues and metrics) and `argen batch` (jobs/runner.py)
  all admit through it.
- The round's plan (`plan_round`): decode feeds first, then prefill chunks under the token budget,
  the shortest remaining prompt first, at fixed chunk boundaries (so a prompt is computed the same
  way however busy the batch is), long chunks paced (pacing.py) while others are active. The plan
  is a `RoundPlan` (vLLM v1's SchedulerOutput); `DecodeBatch.step` runs it and applies the outputs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from argen.engine.images import ImageBatch, ImageRequest
from argen.engine.request import Request
from argen.strategies.base import Feed

if TYPE_CHECKING:  # the batch runs what this module plans; only its type is needed here
    from argen.engine.batch import DecodeBatch
    from argen.engine.sequence import Sequence

# Prompt tokens per prefill pass, and tokens per round (decode feeds first, then prefill chunks): a
# burst of long prompts delays everyone's next token by a chunk, not by whole prefills. Measured on a
# 2-core CPU (benchmarks/serving/burst*): 256 / 512 cut short requests' p99 time to first token
# 6.8x but cost 10% of the decode throughput (each prefill pass of the quantized path dequantizes
# the weights once); 512 / 1024 cut it 4.2x at 2% of the throughput. The server's and batch jobs'.
PREFILL_CHUNK = 512
STEP_TOKENS = 1024


# -- admission -----------------------------------------------------------------------------------
@dataclass(eq=False)
class Waiting:
    """A request in line: `index` names it in the batch's Events and Results; `owner` is the caller's
    handle on it (the server's Ticket, a batch job)."""

    index: int
    request: Request | ImageRequest
    owner: object = None


class Scheduler:
    """A queue of requests waiting in arrival order in front of a DecodeBatch. `take` pops those
    that may join now, `admit` starts one in the batch, `step` runs a round."""

    def __init__(self, batch: DecodeBatch, max_sequences: int | None = None) -> None:
        if max_sequences is not None and max_sequences < 1:
            raise ValueError("max_sequences must be >= 1 (None: no cap)")
        self.batch, self.max_sequences = batch, max_sequences
        self.waiting: deque[Waiting] = deque()
        self.rounds = 0  # rounds run so far

    def add(self, entry: Waiting) -> None:
        self.waiting.append(entry)

    def take(self) -> list[Waiting]:
        """Pop the requests that join the batch now, head first: each while a slot for each of its
        samples and KV memory for its worst case (beside the running ones' and those taken before it)
        are free. The head never jumps the line: when it waits, everyone behind it waits."""
        batch, blocks = self.batch, 0
        taken: list[Waiting] = []
        slots = batch.slots()
        while self.waiting:
            head = self.waiting[0].request
            fits = (self.max_sequences is None or slots + head.n <= self.max_sequences) and batch.can_admit(
                head, blocks
            )
            if not fits and (len(batch) or taken):  # alone, it runs even if larger than the limits
                break
            slots += head.n
            blocks += batch.blocks_needed(head)
            taken.append(self.waiting.popleft())
        return taken

    def admit(self, entry: Waiting) -> Sequence | ImageBatch:
        """Start a taken request in the batch (raises what `Engine.validate` raises)."""
        return self.batch.admit(entry.index, entry.request)

    def step(self) -> list:
        """One round of the decode loop (DecodeBatch.step)."""
        self.rounds += 1
        return self.batch.step()

    def busy(self) -> bool:
        """Whether anything runs or waits."""
        return bool(self.waiting) or len(self.batch) > 0


# -- the round's plan ----------------------------------------------------------------------------
@dataclass
class RoundPlan:
    """What one round runs (vLLM v1's SchedulerOutput): the sequences whose feeds are decode work (with
    those feeds), the prefill chunks, and for the pacer whether a long chunk runs and whether others
    share the round."""

    started: float
    decode: list[tuple[Sequence, list[Feed]]] = field(default_factory=list)
    prefill: list[tuple[Sequence, Feed]] = field(default_factory=list)
    long_chunks: bool = False
    others: bool = False


def chunk_size(request: Request, prefill_chunk: int | None) -> int | None:
    """Prompt positions per prefill pass for this request (None: the whole prompt at once). A set
    prompt goes in one chunk (its members must not see each other); a press below budget 1 takes
    chunks of at most its `chunk` positions (PRESS_CHUNK by default), at the same boundaries in
    `generate` and the server; with chunk 0, it takes the prompt as an unpressed one does."""
    if request.prompt_mask is not None:
        return None
    if request.press is not None and request.press.changes_cache:
        chunk = request.press.chunk
        return prefill_chunk if chunk == 0 else min(prefill_chunk or chunk, chunk)
    return prefill_chunk


def plan_round(batch: DecodeBatch, started: float) -> RoundPlan:
    """This round's work: every sequence waiting on feeds, and one prefill chunk per prefilling
    sequence, shortest remaining first, while the token budget lasts (at least one chunk a round, so
    prefills always progress, but for long chunks the pacer holds back while other requests are
    active). Prompts that start alike are not computed twice: a sequence first takes the blocks others
    registered, and waits a round rather than compute a chunk another sequence is computing now.
    Sets `batch.held_until` when the only work, a long chunk, is held for a moment."""
    plan = RoundPlan(started, [(s, s.waiting) for s in batch.sequences if s.waiting is not None])
    decode_tokens = sum(len(f.tokens) for _, feeds in plan.decode for f in feeds)
    waiting = sorted((s for s in batch.sequences if s.prefilling and s.to_prefill > 0), key=lambda s: s.to_prefill)
    budget = None if batch.token_budget is None else batch.token_budget - decode_tokens
    pacer = batch.pacer
    # Others: sequences decoding, or prefilling a short prompt (which the pacer never holds back).
    plan.others = pacer is not None and (bool(plan.decode) or any(not pacer.paced(s.to_prefill) for s in waiting))
    hold = pacer is not None and pacer.holds(plan.others, started)
    computing = set()
    for seq in waiting:
        cache = batch.prefix_cache(seq)
        if cache is not None:
            attached = cache.attach_prefix(seq.fed[:-1], seq.prefill_positions[:-1])
            seq.stats.cached_prompt_tokens += attached - seq.prefilled
            seq.prefilled = attached
        batch.splice_edit(seq)  # a prompt edit whose prefill reached the edit's end: the rest moves in
        if seq.to_prefill == 0:
            continue  # all there now: the sequence starts next round
        cache = batch.prefix_cache(seq)  # none once an edit's moved keys are in
        start, end = seq.prefilled, len(seq.fed) - 1
        if chunk := chunk_size(seq.request, batch.prefill_chunk):
            end = min(end, (start // chunk + 1) * chunk)
        if seq.edit is not None:  # a prompt edit's chunks stop at the edit's end, where the moved keys go
            end = min(end, seq.edit.splice.new_end)
        n = end - start
        if budget is not None and plan.prefill and n > budget:
            continue
        is_long = pacer is not None and pacer.paced(n)
        if is_long and hold:  # the others have lost their share to long chunks: this one waits
            assert pacer is not None  # a long chunk is one the pacer paces
            if not plan.others:
                batch.held_until = pacer.resume_at()
            continue
        if cache is not None:
            # Another sequence computing the same first block of this chunk this round (a shared
            # prefix, however the two continue) will register it at the round's end: wait a round
            # and take it, rather than compute it twice.
            key = tuple(seq.fed[: min(end, start + cache.pool.block_size)])
            if key in computing:
                continue
            computing.add(key)
        mask = None if seq.prefill_mask is None else seq.prefill_mask[start:end, start:end]
        state = seq.state
        # No logits: prompt scoring projects the hidden states to the vocabulary a few rows at a time.
        feed = Feed(seq.fed[start:end], seq.prefill_positions[start:end], mask, None, 0, state.cache, state.runtime)
        plan.prefill.append((seq, feed))
        plan.long_chunks = plan.long_chunks or is_long
        if budget is not None:
            budget -= n
    return plan
