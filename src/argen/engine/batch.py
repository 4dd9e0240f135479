"""The one decode loop: a changing set of sequences, every one of whose feeds runs in one packed
forward pass per runtime per round.

Each `step()` is a round:
1. every sequence whose strategy is between feeds is advanced to its next feeds (a strategy's step
   is a generator: it yields feeds and returns tokens, see strategies/base.py);
2. prefill chunks are scheduled under the round's token budget, the shortest remaining prefill first,
   so a short prompt is not stuck behind long ones (chunked prefill); chunk boundaries are fixed
   positions, so a prompt is computed the same way however busy the batch is;
3. all feeds are grouped by (runtime, layer plan) and each group runs as one `forward_packed` pass;
4. each sequence receives its rows and runs on until it yields feeds again; the tokens its step
   returns become Events, and a finished sequence a Result.

`generate`, `stream` and the server all run this loop; a single request is a batch of one.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from argen.cache.paged import SeqKV
from argen.engine.request import Event, Failure, Request, Result
from argen.engine.sequence import Emit, Sequence
from argen.logprobs import rows_logprobs
from argen.models.runtime import Segment
from argen.sampling import Sampler
from argen.strategies import DecodeState
from argen.strategies.base import Feed


class DecodeBatch:
    """Sequences decoding together. `admit` adds a request (its prefill runs in the coming rounds),
    `step` runs one round, `remove` drops sequences (cancelled by a client)."""

    def __init__(self, engine, token_budget: int | None = None, prefill_chunk: int | None = None,
                 prefix_caching: bool = True, kv_blocks: int | None = None) -> None:  # fmt: skip
        """`token_budget`: tokens per round, decode feeds first (None: no limit); `prefill_chunk`:
        prompt tokens per prefill pass (None: a whole prompt at once); `prefix_caching`: reuse cached
        blocks of prompts that start the same way (paged runtimes); `kv_blocks`: the KV blocks the
        admitted sequences' worst cases may add up to (None: the whole pool)."""
        self.engine = engine
        self.token_budget, self.prefill_chunk, self.prefix_caching = token_budget, prefill_chunk, prefix_caching
        self.kv_blocks = kv_blocks
        self.sequences: list[Sequence] = []
        self.reserved_blocks = 0  # worst-case KV blocks of the sequences admitted (see can_admit)

    def __len__(self) -> int:
        return len(self.sequences)

    # -- admission ---------------------------------------------------------------------------------
    def blocks_needed(self, request: Request) -> int:
        """KV blocks the request may hold at most: its whole sequence plus its strategy's slack, and for
        n > 1 samples, n - 1 forks that share the prompt's full blocks and may each fill the rest."""
        whole, shared = self._blocks(request)
        return whole + (request.n - 1) * (whole - shared)

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
        chunk = self._chunk(request) if request.press.chunk else None  # chunk 0: the whole prompt, then a press
        pressed = request.press.worst_positions(prefill, len(request.prompt_ids) + budget - 1, chunk,
                                                growth, pool.block_size)  # fmt: skip
        return -(-min(positions, pressed) // pool.block_size), 0

    def _chunk(self, request: Request) -> int | None:
        """Prompt positions per prefill pass for this request (None: the whole prompt at once). A set
        prompt goes in one chunk (its members must not see each other); a press below budget 1 takes
        chunks of at most its `chunk` positions (PRESS_CHUNK by default), at the same boundaries in
        `generate` and the server; with chunk 0, it takes the prompt as an unpressed one does."""
        if request.prompt_mask is not None:
            return None
        if request.press is not None and request.press.changes_cache:
            chunk = request.press.chunk
            return self.prefill_chunk if chunk == 0 else min(self.prefill_chunk or chunk, chunk)
        return self.prefill_chunk

    def can_admit(self, request: Request, pending_blocks: int = 0) -> bool:
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

    def admit(self, index: int, request: Request) -> Sequence:
        engine = self.engine
        engine.validate(request)
        runtime, prompt = engine.runtime, request.prompt_ids
        budget = engine.budget(request)
        cache = runtime.new_cache(1, len(prompt) + budget + request.strategy.kv_slack())
        if request.press is not None:
            request.press.prepare(cache)
        sampler = Sampler(request.params, request.forced, engine.constraint(request))
        state = DecodeState(runtime, cache, sampler, list(prompt), len(prompt), budget)
        positions, mask = self._layout(request, state)
        seq = Sequence(index, request, state, engine.tokenizer, engine.eos_ids, positions, mask)
        state.eos_ids = frozenset(seq.eos_ids)
        seq.reserved = self.blocks_needed(request)  # the forks' share moves to them when they are made
        self.reserved_blocks += seq.reserved
        self.sequences.append(seq)
        return seq

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

    # -- one round ---------------------------------------------------------------------------------
    def step(self) -> list[Event | Result | Failure]:
        """One round: an Event for each sequence that produced tokens, a Result for each that
        finished, a Failure for each that raised (one sequence's error never stops the others)."""
        items: list[Event | Result | Failure] = []
        done: list[Sequence] = []
        decoding = sum(not s.prefilling for s in self.sequences)
        for seq in self.sequences:
            seq.state.batch_size = max(1, decoding)
        for seq in list(self.sequences):
            if not seq.prefilling and seq.waiting is None:
                self._advance(seq, None, items, done)
        running = [s for s in self.sequences if s.waiting is not None and s not in done]
        chunks = self._prefill_chunks(sum(len(f.tokens) for s in running for f in s.waiting))
        for seq in list(self.sequences):
            if seq.prefilling and seq.to_prefill == 0 and seq not in done:  # one-token prompt, or all cached
                self._prefilled(seq, items, done)
        # Group every feed by (runtime, plan): one packed pass each.
        groups: dict[tuple, list[tuple[Sequence, int | None, Feed]]] = defaultdict(list)
        for seq in running:
            for i, feed in enumerate(seq.waiting):
                groups[(id(feed.runtime), feed.plan)].append((seq, i, feed))
        for seq, feed in chunks:
            groups[(id(feed.runtime), None)].append((seq, None, feed))
        outs: dict[int, dict[int, object]] = defaultdict(dict)
        failed: dict[int, Exception] = {}
        for members in groups.values():
            feeds = [feed for _, _, feed in members]
            try:
                results = feeds[0].runtime.forward_packed([_segment(f) for f in feeds], feeds[0].plan)
            except Exception as exc:  # a failing pass fails the sequences in it, not the others
                for seq, _, _ in members:
                    failed.setdefault(id(seq), exc)
                continue
            counted = set()
            for (seq, i, feed), result in zip(members, results, strict=True):
                outs[id(seq)][-1 if i is None else i] = result
                # Passes are counted here, and only here: each forward pass a sequence had rows in,
                # as a target pass, or a draft pass for its drafting / guiding feeds.
                if (id(seq), feed.draft, result.pass_index) not in counted:
                    counted.add((id(seq), feed.draft, result.pass_index))
                    if feed.draft:
                        seq.state.counters.draft_passes += 1
                    else:
                        seq.state.counters.forward_passes += 1
        for seq, feed in chunks:
            if id(seq) in failed:
                self._fail(seq, failed[id(seq)], items, done)
                continue
            if seq.prompt_logprobs is not None:  # row i predicts prompt token prefilled + i + 1
                n_prompt, start = len(seq.request.prompt_ids), seq.prefilled
                targets = seq.fed[start + 1 : min(start + 1 + len(feed.tokens), n_prompt)]
                seq.prompt_logprobs += rows_logprobs(outs[id(seq)][-1].logits, targets, seq.request.prompt_logprobs)
            seq.prefilled += len(feed.tokens)
            if seq.strategy.needs_prompt_hidden:
                seq.prompt_hidden.append(outs[id(seq)][-1].hidden)
            if self._cacheable(seq):  # the full blocks computed so far, for others with the same prompt
                seq.state.cache.register_prefix(seq.fed[: seq.prefilled], seq.prefill_positions)
            press = seq.request.press  # compresses the prompt chunk by chunk: the prefill's peak stays low
            if press is not None and (press.chunk or seq.to_prefill == 0):  # chunk 0: once, at the end
                seq.note_kv()  # the peak is before the press
                seq.press()
            if seq.to_prefill == 0:
                self._prefilled(seq, items, done)
        for seq in running:
            if id(seq) in failed:
                self._fail(seq, failed[id(seq)], items, done)
                continue
            seq.note_kv()  # before the step's cleanup (rejected drafts, dropped forks) gives blocks back
            got = [outs[id(seq)][i] for i in range(len(seq.waiting))]
            self._advance(seq, got[0] if seq.waiting_single else got, items, done)
        for seq, _ in chunks:
            seq.note_kv()
        self.remove(done)
        return items

    def _prefill_chunks(self, decode_tokens: int) -> list[tuple[Sequence, Feed]]:
        """This round's prefill feeds: one chunk per prefilling sequence, shortest remaining first,
        while the token budget lasts (at least one chunk a round, so prefills always progress). A set
        prompt's layout goes in one chunk: its members must not see each other. Prompts that start
        alike are not computed twice: a sequence first takes the blocks others registered, and waits
        a round rather than compute a chunk another sequence is computing now."""
        waiting = sorted((s for s in self.sequences if s.prefilling and s.to_prefill > 0), key=lambda s: s.to_prefill)
        budget = None if self.token_budget is None else self.token_budget - decode_tokens
        chunks, computing = [], set()
        for seq in waiting:
            if self._cacheable(seq):
                attached = seq.state.cache.attach_prefix(seq.fed[:-1], seq.prefill_positions[:-1])
                seq.stats.cached_prompt_tokens += attached - seq.prefilled
                seq.prefilled = attached
                if seq.to_prefill == 0:
                    continue  # all there now: the sequence starts next round
            start, end = seq.prefilled, len(seq.fed) - 1
            if chunk := self._chunk(seq.request):
                end = min(end, (start // chunk + 1) * chunk)
            n = end - start
            if budget is not None and chunks and n > budget:
                continue
            if self._cacheable(seq):
                # Another sequence computing the same first block of this chunk this round (a shared
                # prefix, however the two continue) will register it at the round's end: wait a round
                # and take it, rather than compute it twice.
                key = tuple(seq.fed[: min(end, start + seq.state.cache.pool.block_size)])
                if key in computing:
                    continue
                computing.add(key)
            mask = None if seq.prefill_mask is None else seq.prefill_mask[start:end, start:end]
            state = seq.state
            logits = None if seq.prompt_logprobs is not None else 0  # prompt scoring: every row's logits
            chunks.append((seq, Feed(seq.fed[start:end], seq.prefill_positions[start:end], mask, None, logits,
                                     state.cache, state.runtime)))  # fmt: skip
            if budget is not None:
                budget -= n
        return chunks

    def _cacheable(self, seq: Sequence) -> bool:
        """Whether the sequence shares prompt blocks with others (prefix caching). Not under a press below
        budget 1: it rewrites the blocks (they no longer hold the tokens' own keys), and it runs after
        each prefill chunk, at fixed positions; taking a cached prefix of any length would press it
        elsewhere, and the output would depend on what other requests left in the cache."""
        return (self.prefix_caching and isinstance(seq.state.cache, SeqKV) and seq.prefill_mask is None
                and not seq.strategy.needs_prompt_hidden and seq.prompt_logprobs is None
                and (seq.request.press is None or not seq.request.press.changes_cache))  # fmt: skip

    def _prefilled(self, seq: Sequence, items: list, done: list) -> None:
        """The prompt is in the cache: fork it into the request's n samples (the prompt is prefilled
        once), then for each, emit a replay's output prefix and start the strategy."""
        state = seq.state
        if seq.prompt_hidden:
            state.prompt_hidden = torch.cat(seq.prompt_hidden)
            seq.prompt_hidden = []
        samples = [seq]
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
            self._start(sample, items, done)

    def _start(self, seq: Sequence, items: list, done: list) -> None:
        if seq.request.output_prefix:  # emitted before any step, as generated output
            event = seq.accept(list(seq.request.output_prefix))
            items.append(event)
            if seq.finish_reason is not None:
                items.append(seq.result())
                done.append(seq)
                return
        if seq.state.remaining <= 0:  # max_new_tokens=0: the prompt only (scored), nothing generated
            items.append(seq.accept([]))  # finish_reason "length"
            self._finish(seq, items, done)
            return
        seq.driver = seq.drive()
        self._advance(seq, None, items, done)

    def _advance(self, seq: Sequence, outs, items: list, done: list) -> None:
        """Run the sequence's driver on `outs` until it asks for feeds again (or finishes)."""
        seq.waiting = None
        try:
            value = next(seq.driver) if outs is None else seq.driver.send(outs)
            while isinstance(value, Emit):
                event = seq.accept(value.tokens)
                if event.token_ids or event.text or event.finish_reason or event.prompt_logprobs:
                    items.append(event)
                if seq.finish_reason is not None:
                    self._finish(seq, items, done)
                    return
                value = next(seq.driver)
        except StopIteration:
            self._finish(seq, items, done)
            return
        except Exception as exc:
            self._fail(seq, exc, items, done)
            return
        seq.waiting_single = isinstance(value, Feed)
        feeds = [value] if seq.waiting_single else list(value)
        for feed in feeds:  # a feed names its cache and runtime; a strategy's own by default
            feed.cache = feed.cache if feed.cache is not None else seq.state.cache
            feed.runtime = feed.runtime if feed.runtime is not None else seq.state.runtime
            if feed.positions is None:
                start = feed.cache.lengths[0]
                feed.positions = list(range(start, start + len(feed.tokens)))
        seq.waiting = feeds

    def _finish(self, seq: Sequence, items: list, done: list) -> None:
        state = seq.state
        if self._cacheable(seq) and not state.position_shift:
            # Blocks of the whole conversation so far, for the next turn's prefix (a chat resends it).
            length = state.cache.lengths[0]
            state.cache.register_prefix(state.tokens[:length], list(range(length)))
        items.append(seq.result())
        done.append(seq)

    def _fail(self, seq: Sequence, exc: Exception, items: list, done: list) -> None:
        items.append(Failure(seq.index, exc))
        done.append(seq)


def _segment(feed: Feed) -> Segment:
    return Segment(feed.cache, feed.tokens, feed.positions, feed.mask, feed.num_logits, feed.ffn_cos, feed.features)

