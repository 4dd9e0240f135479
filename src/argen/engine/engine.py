"""The Engine: checks requests once, and runs them through the one decode loop (batch.py), admitted by
the one Scheduler (scheduler.py), for `generate`, `stream`, HTTP and batch jobs alike. It is the only layer that
knows about tokenizer text."""

from __future__ import annotations

from collections.abc import Iterator

from argen.constraints import Constraint, GrammarCompiler, grammar_of
from argen.engine.batch import DecodeBatch
from argen.engine.request import Event, Failure, Request, Result
from argen.engine.scheduler import Scheduler, Waiting
from argen.errors import InvalidRequestError
from argen.logprobs import check_top


class Engine:
    def __init__(self, runtime, tokenizer, eos_ids: set[int]) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.grammars = GrammarCompiler(tokenizer, runtime.info.vocab_size, eos_ids)
        self._compiled: tuple[str, object] | None = None  # the last grammar compiled and its matcher

    def validate(self, request: Request, compile_grammar: bool = True) -> None:
        """Every check a request gets, done once (a request that passed is marked and not re-checked).
        `compile_grammar=False` leaves the response_format's compile to the caller (a server compiles
        it in its sandbox first; `constraint` compiles it here if nobody did)."""
        if request.validated:
            return
        n, context = len(request.prompt_ids), self.runtime.info.max_positions
        if n == 0:
            raise InvalidRequestError("the prompt is empty; give at least one token of prompt")
        if not (isinstance(request.n, int) and not isinstance(request.n, bool) and request.n >= 1):
            raise InvalidRequestError(f"n (samples of the prompt) must be an integer >= 1; got {request.n!r}")
        if n >= context:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the model's context is {context}; shorten the prompt"
            )
        vocab = self.runtime.info.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        forced = list(request.output_prefix) + list((request.forced or {}).values())
        bad = [t for t in forced if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise InvalidRequestError(f"forced token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        bad = [t for t in request.params.logit_bias if t >= vocab]
        if bad:
            raise InvalidRequestError(f"logit_bias token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        bad = [t for t in request.params.stop_token_ids if t >= vocab]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        if request.output_prefix and n + len(request.output_prefix) >= context:
            raise InvalidRequestError("the prompt plus the replayed output fills the model's context")
        check_top(request.prompt_logprobs, "prompt_logprobs")
        if request.prompt_logprobs is not None and request.prompt_positions is not None:
            raise InvalidRequestError(
                "prompt_logprobs needs an ordinary prompt (token i after token i - 1), not a set prompt's layout"
            )
        if request.edit_of is not None:
            self._check_edit(request)
        if (request.forced or request.output_prefix) and not request.strategy.takes_forced_tokens:
            raise InvalidRequestError(
                f"strategy {request.strategy.name!r} picks its tokens by its own search, so it cannot keep a forced "
                "token (an intervention or a counterfactual replay); use a strategy that samples, such as plain"
            )
        request.strategy.check(self.runtime, n, request.params)
        request.strategy.check_samples(request.n)
        if request.press is not None and not self.runtime.capabilities.paged_kv:
            raise InvalidRequestError(
                f"press {request.press.name!r} rewrites the paged KV cache, which needs the native "
                "runtime (load the model with runtime='native'; Llama-family models only)"
            )
        request.grammar = grammar_of(request.params.response_format)
        if request.grammar is not None and compile_grammar:
            # A list of prompts shares one grammar: the last one compiled is reused (each sequence copies it).
            if self._compiled is None or self._compiled[0] != request.grammar:
                self._compiled = (request.grammar, self.grammars.compile(request.grammar))
            request.matcher = self._compiled[1]
        request.validated = True

    def constraint(self, request: Request) -> Constraint | None:
        """A fresh grammar state for one sequence of the validated request (None: no response_format)."""
        if request.grammar is None:
            return None
        if request.matcher is None:
            request.matcher = self.grammars.compile(request.grammar)
        return self.grammars.constraint(request.matcher, len(request.prompt_ids))

    def budget(self, request: Request) -> int:
        """How many tokens the request may generate: max_new_tokens, capped by the context."""
        return min(request.params.max_new_tokens, self.runtime.info.max_positions - len(request.prompt_ids))

    def stream(self, requests: list[Request]) -> Iterator[Event | Result]:
        """Yield token Events as they are produced and each request's Result when it finishes; the
        requests decode together, as many at once as the KV memory holds for their worst cases (the
        others wait their turn, in order). Every request is checked before any work starts."""
        for request in requests:
            self.validate(request)
        # No prefix caching here: reused blocks were computed in other chunks than a fresh prefill
        # computes them, which changes the last bits (and so can flip a near-tie); the server uses it.
        # A request that asks (Request.cache_prompt, or a prompt edit: edit_of) shares blocks anyway.
        scheduler = Scheduler(DecodeBatch(self, prefix_caching=False))  # no sequence cap: the KV memory's
        for i, request in enumerate(requests):
            scheduler.add(Waiting(i, request))
        try:
            while scheduler.busy():
                for entry in scheduler.take():
                    scheduler.admit(entry)
                for item in scheduler.step():
                    if isinstance(item, Failure):
                        raise item.error
                    yield item
        finally:
            scheduler.batch.remove(list(scheduler.batch.sequences))

    def _check_edit(self, request: Request) -> None:
        """A prompt edit (PIE) edits an ordinary prompt whose prefill is all prompt tokens."""
        old, vocab = request.edit_of or [], self.runtime.info.vocab_size
        if not old or len(old) >= self.runtime.info.max_positions:
            raise InvalidRequestError(
                "edit_of (the previous prompt's ids) must be non-empty and shorter than the context"
            )
        if any(not (isinstance(t, int) and 0 <= t < vocab) for t in old):
            raise InvalidRequestError(f"edit_of holds token ids outside the vocabulary (0..{vocab - 1})")
        clash = [
            name
            for name, used in (
                ("a set prompt's layout", request.prompt_positions is not None),
                ("a replayed output prefix", bool(request.output_prefix)),
                ("prompt_logprobs (every prompt token's logits are computed)", request.prompt_logprobs is not None),
                ("a KV-cache press (it rewrites the cached blocks)", request.press is not None),
            )
            if used
        ]
        if clash:
            raise InvalidRequestError(f"a prompt edit cannot be combined with {', '.join(clash)}")

    def run(self, requests: list[Request]) -> list[Result]:
        results = [item for item in self.stream(requests) if isinstance(item, Result)]
        return sorted(results, key=lambda r: (r.index, r.sample_index))
