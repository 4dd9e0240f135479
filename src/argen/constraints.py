"""Structured output: a grammar (JSON schema, regex, Lark) that every output token must follow.

The grammar engine is llguidance, picked by measurement (benchmarks/structured/engines.md): its mask
costs ~0.1 ms a token on the default model's 49k vocabulary (xgrammar is faster, outlines-core
needs a precompiled index per schema); it rolls back consumed tokens, and, unlike the others, it
bounds the work a grammar may cost per token (`LLParserLimits`), which a server taking grammars from
untrusted clients needs.

A request's grammar comes from `SamplingParams.response_format` (OpenAI's shape plus two argen
types) and is checked by the Engine once (`GrammarCompiler.check`). Each sequence gets a
`Constraint`: the sampler asks it for the mask before it draws (so a speculative draft the grammar
forbids is simply rejected by the verifier, and each beam is masked), and the constraint follows
whichever context it is asked about by rolling back to the common prefix and consuming the rest.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from argen.errors import InvalidRequestError

# What a response_format may be (OpenAI's "text", "json_object", "json_schema"; argen's "regex" and
# "grammar", a Lark grammar as llguidance reads it).
FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
MAX_GRAMMAR_CHARS = 100_000  # a schema, regex or grammar longer than this is refused


def grammar_of(response_format: dict | None) -> str | None:
    """The llguidance grammar for a response_format (None: unconstrained), or an InvalidRequestError
    that says what is wrong with it. Does not need a tokenizer: the cheap checks, done when the
    SamplingParams are made."""
    if response_format is None:
        return None
    import llguidance

    if not isinstance(response_format, dict) or response_format.get("type") not in FORMAT_TYPES:
        raise InvalidRequestError(f"response_format must be an object whose type is one of {', '.join(FORMAT_TYPES)}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict) or isinstance(schema, bool):
            raise InvalidRequestError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
    else:
        text = response_format.get(kind)
        if not isinstance(text, str) or not text:
            raise InvalidRequestError(f'response_format of type {kind} needs a non-empty string "{kind}"')
        _check_size(kind, len(text))
        return llguidance.LLMatcher.grammar_from_regex(text) if kind == "regex" else \
            llguidance.LLMatcher.grammar_from_lark(text)  # fmt: skip
    _check_size("json_schema", len(json.dumps(schema)))
    try:
        # Compact JSON (no free whitespace): a model can otherwise pad an object with newlines forever.
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except ValueError as exc:
        raise InvalidRequestError(f"response_format: the JSON schema is not valid: {exc}") from exc


def _check_size(kind: str, chars: int) -> None:
    if chars > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(f"response_format: the {kind} has {chars} characters; at most {MAX_GRAMMAR_CHARS}")


def limits():
    """Work bounds for one grammar (llguidance's defaults, made explicit: a server takes grammars from
    clients it does not trust). Error messages leave out the grammar and parser state."""
    import llguidance

    return llguidance.LLParserLimits(step_lexer_fuel=200_000, step_max_items=50_000, max_grammar_size=500_000,
                                     max_lexer_states=250_000, verbose_errors=False)  # fmt: skip


class GrammarCompiler:
    """Per model: the tokenizer as llguidance sees it (built once, ~0.5 s), grammar checks, matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_ids)
        self._ll = None

    @property
    def ll_tokenizer(self):
        if self._ll is None:
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size,
                                                    eos_token=self._eos or None)  # fmt: skip
        return self._ll

    def check(self, grammar: str) -> None:
        """Raise InvalidRequestError if llguidance cannot build the grammar within its limits."""
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer,
                                                                                 limits=limits())  # fmt: skip
        if is_error:
            raise InvalidRequestError(f"response_format: the grammar is not valid: {messages[0][:500]}")

    def constraint(self, grammar: str, prompt_len: int) -> Constraint:
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=limits())
        if matcher.is_error():
            raise InvalidRequestError(f"response_format: the grammar is not valid: {matcher.get_error()[:500]}")
        return Constraint(matcher, prompt_len, self.vocab_size)


class Constraint:
    """One sequence's grammar state. `mask(context)` gives the tokens the grammar allows after
    `context` (prompt + output so far); the matcher is moved to that context first, so callers that
    ask about several contexts (beams, a verifier walking a draft) need no bookkeeping."""

    def __init__(self, matcher, prompt_len: int, vocab_size: int) -> None:
        self.matcher, self.prompt_len, self.vocab_size = matcher, prompt_len, vocab_size
        self.consumed: list[int] = []  # output tokens the matcher has followed, in order
        self.real: list[bool] = []  # whether the matcher took each one (not past its end)
        self.mask_seconds = 0.0  # time spent computing masks (the bench reports it per token)
        self.masks = 0

    def fork(self) -> Constraint:
        """An independent copy in the same state (a request's other samples, n > 1)."""
        other = Constraint(self.matcher.deep_copy(), self.prompt_len, self.vocab_size)
        other.consumed, other.real = list(self.consumed), list(self.real)
        return other

    def _follow(self, output: list[int]) -> None:
        n = len(self.consumed)
        if output[:n] == self.consumed:  # the usual case, compared in C: the context only grew
            common = n
        else:
            common = next(i for i, (a, b) in enumerate(zip(self.consumed, output + [-1])) if a != b)
        if common < len(self.consumed):
            self.matcher.rollback(sum(self.real[common:]))
            del self.consumed[common:], self.real[common:]
        for token in output[common:]:
            # Past the end of the grammar (an EOS consumed) a matcher takes nothing more: tokens a draft
            # puts there are kept here only, so that a rollback undoes exactly what the matcher took.
            real = not self.matcher.is_stopped()
            if real and not self.matcher.consume_token(token):
                # A token the grammar forbids got into the output (a forced token of a counterfactual,
                # or a replayed prefix): nothing after it can be constrained.
                raise InvalidRequestError(f"the output breaks the response_format grammar at output token "
                                          f"{len(self.consumed)} (id {token}): {self.matcher.get_error()[:200]}")  # fmt: skip
            self.consumed.append(token)
            self.real.append(real)

    def allowed(self, context: list[int]) -> torch.Tensor:
        """A bool tensor over the vocabulary: which tokens may follow `context`."""
        self._follow(list(context[self.prompt_len :]))
        started = time.perf_counter()
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))
        self.mask_seconds += time.perf_counter() - started
        self.masks += 1
        if self.matcher.is_error():
            raise InvalidRequestError(f"response_format: the grammar failed: {self.matcher.get_error()[:200]}")
        return allowed

    def apply(self, logits: torch.Tensor, context: list[int]) -> torch.Tensor:
        """`logits` with every token the grammar forbids after `context` set to -inf."""
        allowed = self.allowed(context).to(logits.device)
        n = min(len(allowed), logits.shape[-1])
        out = logits.float().clone()
        out[..., :n] = out[..., :n].masked_fill(~allowed[:n], float("-inf"))
        out[..., n:] = float("-inf")  # the model's padding rows beyond the tokenizer's vocabulary
        return out
