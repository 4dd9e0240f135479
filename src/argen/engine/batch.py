"""The one decode loop: a changing set of sequences, every one of whose feeds runs in one packed
forward pass per runtime per round.

Each `step()` is a round, plan -> run -> apply:
1. `_advance_idle`: every sequence whose strategy is between feeds is advanced to its next feeds (a
   strategy's step is a generator: it yields feeds and returns tokens, see strategies/base.py);
2. `plan_round` (scheduler.py, the one place that decides who runs) makes the round's RoundPlan:
   those decode feeds, then prefill chunks under the token budget (chunked prefill, paced);
3. `_run`: all feeds are grouped by (runtime, layer plan) and each group runs as one
   `forward_packed` pass; passes are counted there;
4. `_apply`: each prefill chunk (`_chunk_done`) and each sequence receives its rows and runs on
   until it yields feeds again; the tokens its step returns become Events, and a finished
   sequence a Result (a RoundOutput).

5. `_step_images`: every image batch (images.py: image requests, their images as rows) runs one
   forward pass of its image model; a finished one hands back each request's ImagesDone.

Who joins the batch is the Scheduler's decision too (scheduler.py); `generate`, `stream`, the
server and `argen batch` all run this loop; a single request is a batch of one.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from argen.cache.paged import SeqKV
from argen.cache.pie import plan_splice
from argen.engine.images import ImageBatch, ImageRequest, ImagesDone
from argen.engine.pacing import PrefillPacer
from argen.engine.request import Event, Failure, Request, Result
from argen.engine.scheduler import RoundPlan, chunk_size, plan_round
from argen.engine.sequence import Emit, PendingEdit, Sequence
from argen.logprobs import prompt_logprobs
from argen.sampling import Sampler
from argen.strategies import DecodeState
from argen.strategies.base import Feed


@dataclass
class RoundOutput:
    """What a round hands back (`items`: Events, Results, Failures) and the sequences it ended."""

    items: list[Event | Result | Failure | ImagesDone] = field(default_factory=list)
    done: list[Sequence] = field(default_factory=list)


class DecodeBatch:
    """Sequences decoding together, and image batches beside them (images.py). `admit` adds a request
    (its prefill runs in the coming rounds), `step` runs one round, `remove` drops sequences (cancelled
    by a client), `drop_images` image requests."""

    def __init__(
        self,
        engine,
        token_budget: int | None = None,
        prefill_chunk: int | None = None,
        prefix_caching: bool = True,
        kv_blocks: int | None = None,
        pacer: PrefillPacer | None = None,
    ) -> None:
        """`token_budget`: tokens per round, decode feeds first (None: no limit); `prefill_chunk`:
        prompt tokens per prefill pass (None: a whole prompt at once); `prefix_caching`: reuse cached
        blocks of prompts that start the same way (paged runtimes); `kv_blocks`: the KV blocks the
        admitted sequences' worst cases may add up to (None: the whole pool); `pacer`: holds long
        prefill chunks back while they would slow the other sequences too much (None: never)."""
        self.engine = engine
        self.token_budget, self.prefill_chunk, self.prefix_caching = token_budget, prefill_chunk, prefix_caching
        self.kv_blocks, self.pacer = kv_blocks, pacer
        # Set by a round whose only work, a long prefill chunk, the pacer held for a moment: when it
        # may run (the caller may wait until then rather than run empty rounds).
        self.held_until: float | None = None
        self.sequences: list[Sequence] = []
        self.images: list[ImageBatch] = []  # image requests' rows, one batch per key (images.py)
        self.reserved_blocks = 0  # worst-case KV blocks of the sequences admitted (see can_admit)

    def __len__(self) -> int:
        """Rows running: sequences and images."""
        return len(self.sequences) + self.image_rows()

    def image_rows(self) -> int:
        return sum(b.rows for b in self.images)

    # -- admission ---------------------------------------------------------------------------------
    def blocks_needed(self, request: Request | ImageRequest) -> int:
        """KV blocks the request may hold at most: its whole sequence plus its strategy's slack, and for
        n > 1 samples, n - 1 forks that share the prompt's full blocks and may each fill the rest. An
        image request none: the image decoders keep their own small state, outside the KV pool."""
        if isinstance(request, ImageRequest):
            return 0
        whole, shared = self._blocks(request)
        pool = self._pool()
        # A prompt edit holds the previous prompt's cached blocks from admission until its splice.
        source = -(-len(request.edit_of) // pool.block_size) if request.edit_of and pool is not None else 0
        return whole + (request.n - 1) * (whole - shared) + source

    def _blocks(self, request: Request) -> tuple[int, int]:
        """(blocks of one sequence's worst case, full blocks of its prefill: never written again, so
        the forks of a request with n > 1 keep sharing them)."""
        pool = self._pool()
        if pool is None:
            return 0, 0
        budget, slack = self.engine.budget(request), request.strategy.kv_slack()
        positions = len(request.prompt_ids) + budget + slack
        prefill = len(request.prompt_ids) + len(request.output_prefix) - 1
        if request.press is None:
            return -(-positions // pool.block_size), prefill // pool.block_size
        # Pressed: the worst case is the press's budget plus one step's growth (the whole output for a
        # strategy whose output is one step), or a prefill chunk on top of a pressed prefix. Presses
        # rewrite the prompt's blocks, so a request's forks share none of them for sure.
        growth = budget + slack if request.strategy.whole_output_in_one_step else max(1, slack)
        chunk = (
            chunk_size(request, self.prefill_chunk) if request.press.chunk else None
        )  # chunk 0: the whole prompt, then a press
        pressed = request.press.worst_positions(
            prefill, len(request.prompt_ids) + budget - 1, chunk, growth, pool.block_size
        )
        return -(-min(positions, pressed) // pool.block_size), 0

    def slots(self) -> int:
        """Sequences running, a request not yet forked into its n samples counted as n (the scheduler's
        `max_sequences` counts these), and image rows (one per image)."""
        running = sum(s.request.n if s.prefilling and s.sample_index == 0 else 1 for s in self.sequences)
        return running + self.image_rows()

    def can_admit(self, request: Request | ImageRequest, pending_blocks: int = 0) -> bool:
        """Whether the request's worst case fits beside the admitted sequences' worst cases (and
        `pending_blocks` about to be admitted), so that an admitted request never runs out of KV
        memory midway."""
        limit = self.kv_blocks_limit()
        return limit is None or self.reserved_blocks + pending_blocks + self.blocks_needed(request) <= limit

    def kv_blocks_limit(self) -> int | None:
        """The KV blocks admission may reserve: the pool's, or fewer if `kv_blocks` says so (None: no
        paged pool). Since every admitted sequence's worst case is reserved, the running sequences never
        hold more (but for a lone request larger than the limit, which the scheduler runs by itself)."""
        pool = self._pool()
        if pool is None:
            return None
        return pool.max_blocks if self.kv_blocks is None else min(self.kv_blocks, pool.max_blocks)

    def admit(self, index: int, request: Request | ImageRequest) -> Sequence | ImageBatch:
        if isinstance(request, ImageRequest):
            return self._admit_images(index, request)
        engine = self.engine
        engine.validate(request)
        runtime, prompt = engine.runtime, request.prompt_ids
        budget = engine.budget(request)
        cache = runtime.new_cache(1, len(prompt) + budget + request.strategy.kv_slack())
        if request.press is not None:
            request.press.prepare(cache)
        sampler = Sampler(
            request.params, request.forced, engine.constraint(request), prompt_len=len(prompt), eos_ids=engine.eos_ids
        )
        state = DecodeState(runtime, cache, sampler, list(prompt), len(prompt), budget)
        positions, mask = self._layout(request, state)
        seq = Sequence(index, request, state, engine.tokenizer, engine.eos_ids, positions, mask)
        state.eos_ids = frozenset(seq.eos_ids)
        seq.reserved = self.blocks_needed(request)  # the forks' share moves to them when they are made
        self.reserved_blocks += seq.reserved
        self.sequences.append(seq)
        if request.edit_of is not None:
            self._plan_edit(seq)
        return seq

    def _admit_images(self, index: int, request: ImageRequest) -> ImageBatch:
        """The request's images join the batch of its key that has not started yet (those admitted in
        the same round), or start one."""
        if request.checked is None:
            request.check()
        key = request.key()
        batch = next((b for b in self.images if b.key == key and b.steps is None), None)
        if batch is None:
            batch = ImageBatch(key)
            self.images.append(batch)
        batch.add(index, request)
        return batch

    def drop_images(self, indices: set[int]) -> None:
        """Image requests cancelled by their clients (ImageBatch.drop); a batch left empty goes."""
        for batch in self.images:
            batch.drop(indices)
        self.images = [b for b in self.images if b.members]

    # -- prompt edits (PIE, cache/pie.py) ------------------------------------------------------------
    def _plan_edit(self, seq: Sequence) -> None:
        """At admission: take the previous prompt's cached blocks (held until the splice, so they cannot
        be evicted meanwhile) and plan which of its positions move; or say in the stats why the edited
        prompt is prefilled as any prompt is (with what the prefix cache holds of its start)."""
        request, stats = seq.request, seq.stats
        assert request.edit_of is not None  # called for edit requests only
        cache = self.prefix_cache(seq)
        if cache is None or not self.engine.runtime.capabilities.key_rotation:
            stats.edit_fallback = (
                "this request cannot share cached prompt blocks (its strategy needs the prompt's hidden "
                "states, or the runtime's cache is not paged with movable keys): prefilled in full"
            )
            return
        old, end = list(request.edit_of), len(seq.fed) - 1  # end: the positions a prefill computes
        splice = plan_splice(old, list(request.prompt_ids))
        if splice.new_end >= end:  # the edit is at the very end: the prefix cache holds everything before it
            return
        source = SeqKV(cache.pool, len(old))
        held = source.attach_prefix(old, list(range(len(old))))
        moved = min(held - splice.old_end, end - splice.new_end)
        if moved <= 0:
            source.free()
            stats.edit_fallback = (
                "the previous prompt's keys after the edit are not in the prefix cache (evicted, or never "
                "computed): the edited prompt was prefilled from the edit on"
            )
            return
        seq.edit = PendingEdit(splice, source, moved)

    def splice_edit(self, seq: Sequence) -> None:
        """Once the prefill reaches the edit's end: append the previous prompt's keys and values of the
        positions after the edit, rotated to their new positions, instead of computing them."""
        edit = seq.edit
        if edit is None or seq.prefilled < edit.splice.new_end:
            return
        seq.edit = None
        if seq.prefilled == edit.splice.new_end:  # more: the edited prompt itself was cached; nothing to move
            cache, splice = seq.state.cache, edit.splice
            assert isinstance(cache, SeqKV)  # an edit is planned only for a paged cache (prefix_cache)
            cache.append_from(edit.source, splice.old_end, edit.moved)
            self.engine.runtime.rotate_keys(cache, splice.new_end, edit.moved, splice.shift)
            seq.prefilled += edit.moved
            seq.stats.edit_moved_tokens = edit.moved
            seq.spliced = True
        edit.source.free()

    @staticmethod
    def _layout(request: Request, state: DecodeState) -> tuple[list[int], torch.Tensor | None]:
        """Positions of the tokens to prefill (and a mask among them, for a set prompt)."""
        n, extra = len(request.prompt_ids), len(request.output_prefix)
        if request.prompt_positions is None:
            return list(range(n + extra)), None
        # Output-prefix tokens follow the last prompt position and see everything before them.
        last = request.prompt_positions[-1]
        state.position_shift = last - (n - 1)
        positions = list(request.prompt_positions) + list(range(last + 1, last + 1 + extra))
        if request.prompt_mask is None:
            return positions, None
        mask = torch.ones(n + extra, n + extra, dtype=torch.bool).tril()
        mask[:n, :n] = request.prompt_mask
        return positions, mask

    def remove(self, drop: list[Sequence]) -> None:
        for seq in drop:
            if seq in self.sequences:
                self.sequences.remove(seq)
                self.reserved_blocks -= seq.reserved
                if seq.driver is not None:
                    seq.driver.close()
                seq.release()

    def kv_bytes_held(self) -> int:
        """KV bytes the running sequences hold now (blocks shared by several count once)."""
        pool = self._pool()
        if pool is None:
            return sum(s.state.cache.peak_bytes for s in self.sequences)
        return pool.held_bytes

    def kv_blocks_held(self) -> tuple[int, int]:
        """KV blocks the running sequences hold now, and the most they held at once since
        `reset_kv_peak` (inside rounds too: a prefill chunk before its press); (0, 0) without a pool."""
        pool = self._pool()
        return (0, 0) if pool is None else (pool.held, pool.peak_held)

    def reset_kv_peak(self) -> None:
        pool = self._pool()
        if pool is not None:
            pool.peak_held = pool.held

    def kv_bytes_used(self) -> int:
        """KV bytes the running sequences' lengths need (what an unpadded cache would hold)."""
        return sum(seq.state.cache.lengths[0] * seq.state.cache.bytes_per_position() for seq in self.sequences)

    def _pool(self):
        runtime = self.engine.runtime
        return runtime.kv_pool() if runtime.capabilities.paged_kv else None

    # -- one round: plan -> run -> apply -------------------------------------------------------------
    def step(self) -> list[Event | Result | Failure | ImagesDone]:
        """One round: an Event for each sequence that produced tokens, a Result for each that
        finished, a Failure for each that raised (one sequence's error never stops the others), an
        ImagesDone for each image request whose batch finished."""
        out = RoundOutput()
        self.held_until = None
        plan_started = time.perf_counter()
        self._advance_idle(out)
        plan = plan_round(self, plan_started)
        for seq in list(self.sequences):
            if seq.prefilling and seq.to_prefill == 0 and seq not in out.done:  # one-token prompt, or all cached
                self._prefilled(seq, out)
        rows, failed = self._run(plan)
        self._apply(plan, rows, failed, out)
        self.remove(out.done)
        self._step_images(out)
        if self.pacer is not None:
            ended = time.perf_counter()
            self.pacer.record(ended - plan.started, plan.long_chunks, plan.others, ended)
        return out.items

    def _step_images(self, out: RoundOutput) -> None:
        """One pass of every image batch; a finished one leaves with its requests' ImagesDone, a failing
        one with a Failure for each of its requests (their checks ran before admission, so this is a bug
        or the model's own error, not one request's fault)."""
        for batch in list(self.images):
            try:
                done = batch.step()
            except Exception as exc:
                out.items.extend(Failure(index, exc) for index, _ in batch.members)
                self.images.remove(batch)
                continue
            if done:
                out.items.extend(done)
                self.images.remove(batch)

    def _advance_idle(self, out: RoundOutput) -> None:
        """Every decoding sequence between feeds asks its strategy for the next ones."""
        decoding = sum(not s.prefilling for s in self.sequences)
        for seq in self.sequences:
            seq.state.batch_size = max(1, decoding)
        for seq in list(self.sequences):
            if not seq.prefilling and seq.waiting is None:
                self._advance(seq, None, out)

    def _run(self, plan: RoundPlan) -> tuple[dict[int, dict[int, object]], dict[int, Exception]]:
        """Every feed of the plan, grouped by (runtime, layer plan): one packed pass each. Returns each
        sequence's rows (by feed index; -1: its prefill chunk) and the error of each whose pass failed."""
        groups: dict[tuple, list[tuple[Sequence, int | None, Feed]]] = defaultdict(list)
        for seq, waiting in plan.decode:
            for i, feed in enumerate(waiting):
                groups[(id(feed.runtime), feed.plan)].append((seq, i, feed))
        for seq, feed in plan.prefill:
            groups[(id(feed.runtime), None)].append((seq, None, feed))
        rows: dict[int, dict[int, object]] = defaultdict(dict)
        failed: dict[int, Exception] = {}
        for members in groups.values():
            feeds = [feed for _, _, feed in members]
            try:
                results = feeds[0].runtime.forward_packed([f.segment() for f in feeds], feeds[0].plan)
            except Exception as exc:  # a failing pass fails the sequences in it, not the others
                for seq, _, _ in members:
                    failed.setdefault(id(seq), exc)
                continue
            counted = set()
            for (seq, index, feed), result in zip(members, results, strict=True):
                rows[id(seq)][-1 if index is None else index] = result
                # Passes are counted here, and only here: each forward pass a sequence had rows in,
                # as a target pass, or a draft pass for its drafting / guiding feeds.
                if (id(seq), feed.draft, result.pass_index) not in counted:
                    counted.add((id(seq), feed.draft, result.pass_index))
                    if feed.draft:
                        seq.state.counters.draft_passes += 1
                    else:
                        seq.state.counters.forward_passes += 1
        return rows, failed

    def _apply(self, plan: RoundPlan, rows: dict, failed: dict[int, Exception], out: RoundOutput) -> None:
        """Hand each prefill chunk and each decoding sequence its rows."""
        for seq, feed in plan.prefill:
            if id(seq) in failed:
                self._fail(seq, failed[id(seq)], out)
            else:
                self._chunk_done(seq, feed, rows[id(seq)][-1], out)
        for seq, waiting in plan.decode:
            if id(seq) in failed:
                self._fail(seq, failed[id(seq)], out)
                continue
            seq.note_kv()  # before the step's cleanup (rejected drafts, dropped forks) gives blocks back
            got = [rows[id(seq)][i] for i in range(len(waiting))]
            self._advance(seq, got[0] if seq.waiting_single else got, out)
        for seq, _ in plan.prefill:
            seq.note_kv()

    def _chunk_done(self, seq: Sequence, feed: Feed, row, out: RoundOutput) -> None:
        """A prefill chunk is in the cache: score its prompt tokens, keep its hidden states, register its
        full blocks for prompts that start the same way, press it; the last one starts the sequence."""
        k = seq.request.prompt_logprobs  # set, and then seq.prompt_logprobs too, or neither
        if seq.prompt_logprobs is not None and k is not None:  # row i predicts prompt token prefilled + i + 1
            n_prompt, start = len(seq.request.prompt_ids), seq.prefilled
            targets = seq.fed[start + 1 : min(start + 1 + len(feed.tokens), n_prompt)]
            seq.prompt_logprobs += prompt_logprobs(feed.runtime.head, row.hidden, targets, k)
        seq.prefilled += len(feed.tokens)
        if seq.strategy.needs_prompt_hidden:
            seq.prompt_hidden.append(row.hidden)
        cache = self.prefix_cache(seq)
        if cache is not None:  # the full blocks computed so far, for others with the same prompt
            cache.register_prefix(seq.fed[: seq.prefilled], seq.prefill_positions)
        press = seq.request.press  # compresses the prompt chunk by chunk: the prefill's peak stays low
        if press is not None and (press.chunk or seq.to_prefill == 0):  # chunk 0: once, at the end
            seq.note_kv()  # the peak is before the press
            seq.press()
        if seq.to_prefill == 0:
            self._prefilled(seq, out)

    def prefix_cache(self, seq: Sequence) -> SeqKV | None:
        """The sequence's cache if it shares prompt blocks with others (prefix caching), else None. Not
        under a press below
        budget 1: it rewrites the blocks (they no longer hold the tokens' own keys), and it runs after
        each prefill chunk, at fixed positions; taking a cached prefix of any length would press it
        elsewhere, and the output would depend on what other requests left in the cache."""
        cache = seq.state.cache
        request = seq.request
        cacheable = (
            (self.prefix_caching or request.cache_prompt or request.edit_of is not None)
            and not seq.spliced  # moved keys are not the edited prompt's own: never registered as such
            and seq.prefill_mask is None
            and not seq.strategy.needs_prompt_hidden
            and seq.prompt_logprobs is None
            and (seq.request.press is None or not seq.request.press.changes_cache)
        )
        return cache if cacheable and isinstance(cache, SeqKV) else None

    def _prefilled(self, seq: Sequence, out: RoundOutput) -> None:
        """The prompt is in the cache: fork it into the request's n samples (the prompt is prefilled
        once), then for each, emit a replay's output prefix and start the strategy."""
        state = seq.state
        if seq.prompt_hidden:
            state.prompt_hidden = torch.cat(seq.prompt_hidden)
            seq.prompt_hidden = []
        samples = [seq]
        if seq.strategy.samples_together:  # sample 0 decides them all; the others read it here
            state.samples = {"n": seq.request.n}
        if seq.request.n > 1:
            # Made here and only here: forks are born prefilled and never come back to this method.
            whole, _ = self._blocks(seq.request)
            forks = [seq.fork(i) for i in range(1, seq.request.n)]
            for fork in forks:
                fork.reserved = (seq.reserved - whole) // len(forks)
            seq.reserved = whole
            self.sequences.extend(forks)
            samples += forks
        for sample in samples:
            self._start(sample, out)

    def _start(self, seq: Sequence, out: RoundOutput) -> None:
        if seq.request.output_prefix:  # emitted before any step, as generated output
            prefix = list(seq.request.output_prefix)
            event = seq.accept(prefix, ["replayed"] * len(prefix))
            out.items.append(event)
            if seq.finish_reason is not None:
                out.items.append(seq.result())
                out.done.append(seq)
                return
        if seq.state.remaining <= 0:  # max_new_tokens=0: the prompt only (scored), nothing generated
            out.items.append(seq.accept([]))  # finish_reason "length"
            self._finish(seq, out)
            return
        seq.driver = seq.drive()
        self._advance(seq, None, out)

    def _advance(self, seq: Sequence, outs, out: RoundOutput) -> None:
        """Run the sequence's driver on `outs` until it asks for feeds again (or finishes)."""
        seq.waiting = None
        driver = seq.driver
        assert driver is not None, "a sequence advances once its prefill is done"
        try:
            value = next(driver) if outs is None else driver.send(outs)
            while isinstance(value, Emit):
                event = seq.accept(value.tokens, value.origins)
                if event.token_ids or event.text or event.finish_reason or event.prompt_logprobs:
                    out.items.append(event)
                if seq.finish_reason is not None:
                    self._finish(seq, out)
                    return
                value = next(driver)
        except StopIteration:
            self._finish(seq, out)
            return
        except Exception as exc:
            self._fail(seq, exc, out)
            return
        seq.waiting_single = isinstance(value, Feed)
        feeds = [value] if isinstance(value, Feed) else list(value)
        for feed in feeds:  # a feed names its cache and runtime; a strategy's own by default
            feed.cache = feed.cache if feed.cache is not None else seq.state.cache
            feed.runtime = feed.runtime if feed.runtime is not None else seq.state.runtime
            if feed.positions is None:
                start = feed.cache.lengths[0]
                feed.positions = list(range(start, start + len(feed.tokens)))
        seq.waiting = feeds

    def _finish(self, seq: Sequence, out: RoundOutput) -> None:
        state = seq.state
        cache = self.prefix_cache(seq)
        if cache is not None and not state.position_shift:
            # Blocks of the whole conversation so far, for the next turn's prefix (a chat resends it).
            length = cache.lengths[0]
            cache.register_prefix(state.tokens[:length], list(range(length)))
        out.items.append(seq.result())
        out.done.append(seq)

    def _fail(self, seq: Sequence, exc: Exception, out: RoundOutput) -> None:
        out.items.append(Failure(seq.index, exc))
        out.done.append(seq)
