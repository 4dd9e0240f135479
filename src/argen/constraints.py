"""Structured output: a grammar (JSON schema, regex, Lark) that every output token must follow.

The grammar engine is llguidance, picked by measurement (benchmarks/structured/engines.md): its mask
costs ~0.1 ms a token on the default model's 49k vocabulary (xgrammar is faster, outlines-core
needs a precompiled index per schema); it rolls back consumed tokens, and, unlike the others, it
bounds the work a grammar may cost per token (`LLParserLimits`), which a server taking grammars from
untrusted clients needs.

A request's grammar comes from `SamplingParams.response_format` (OpenAI's shape plus two argen
types) and is compiled once (`GrammarCompiler.compile`: by the Engine, or for a server in its grammar
sandbox first, `server/grammar_sandbox.py`); each sequence gets a copy of that matcher, a
`Constraint`: the sampler asks it for the mask before it draws (so a speculative draft the grammar
forbids is simply rejected by the verifier, and each beam is masked), and the constraint follows
whichever context it is asked about by rolling back to the common prefix and consuming the rest.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from argen.errors import InvalidRequestError
from argen.grammar_check import LIMITS, describe, first_error

# What a response_format may be (OpenAI's "text", "json_object", "json_schema"; argen's "regex" and
# "grammar", a Lark grammar as llguidance reads it).
FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
MAX_GRAMMAR_CHARS = 100_000  # a schema, regex or grammar longer than this is refused
# Regexes one allOf may combine (`pattern`, `format`, `patternProperties` in its subschemas): llguidance
# intersects them and decides whether the intersection is empty, in time and memory exponential in
# their number (8: 13 ms; 12: 1.7 s and 90 MB; 18: 30 s and 0.9 GB).
MAX_ALLOF_PATTERNS = 8
_PATTERN_KEYS = ("pattern", "format", "patternProperties")


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
            raise InvalidRequestError(
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}'
            )
    else:
        text = response_format.get(kind)
        if not isinstance(text, str) or not text:
            raise InvalidRequestError(f'response_format of type {kind} needs a non-empty string "{kind}"')
        _check_size(kind, len(text))
        return (
            llguidance.LLMatcher.grammar_from_regex(text)
            if kind == "regex"
            else llguidance.LLMatcher.grammar_from_lark(text)
        )
    _check_size("json_schema", len(json.dumps(schema)))
    _check_intersections(schema)
    try:
        # Compact JSON (no free whitespace): a model can otherwise pad an object with newlines forever.
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except ValueError as exc:
        raise InvalidRequestError(f"response_format: the JSON schema is not valid: {exc}") from exc


def _check_size(kind: str, chars: int) -> None:
    if chars > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(f"response_format: the {kind} has {chars} characters; at most {MAX_GRAMMAR_CHARS}")


def _check_intersections(schema: Any) -> None:
    """Refuse an allOf that combines more than MAX_ALLOF_PATTERNS regexes (nested allOfs count
    together). A static bound with a clear message; the server's grammar sandbox bounds whatever
    else is expensive to compile."""
    # Iterative post-order walk: a schema may nest deeper than Python's recursion limit.
    stack: list[tuple[Any, bool]] = [(schema, False)]
    counts: list[int] = []  # the pattern count of each finished subtree, in order
    while stack:
        node, done = stack.pop()
        children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
        if not done:
            stack.append((node, True))
            stack.extend((child, False) for child in children)
            continue
        count = sum(counts.pop() for _ in children)
        if isinstance(node, dict):
            count += sum(1 for key in _PATTERN_KEYS if key in node)
            if "allOf" in node and count > MAX_ALLOF_PATTERNS:
                raise InvalidRequestError(
                    f"response_format: an allOf combines {count} regexes (pattern, format, "
                    f"patternProperties); at most {MAX_ALLOF_PATTERNS}: their intersection "
                    "costs time exponential in their number"
                )
        counts.append(count)


def limits():
    """llguidance's work bounds for one grammar (grammar_check.LIMITS)."""
    import llguidance

    return llguidance.LLParserLimits(**LIMITS)


class GrammarCompiler:
    """Per model: the tokenizer as llguidance sees it (built once, ~0.5 s), and compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        self._tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, sorted(eos_ids)
        self._ll = None

    def tokenizer_json(self) -> str:
        """The tokenizer in the `tokenizers` library's JSON (what llguidance builds its own from; the
        server's grammar sandbox sends it to its children). As `llguidance.hf.from_tokenizer` does:
        without padding or truncation."""
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise InvalidRequestError("structured output needs a fast (Rust) tokenizer; this model's is not one")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        return backend.to_str()

    @property
    def ll_eos(self) -> list[int] | int | None:
        """The end-of-sequence token(s) llguidance's tokenizer is built with: the model's, else the
        tokenizer's own."""
        return self.eos or self._tokenizer.eos_token_id

    @property
    def ll_tokenizer(self):
        if self._ll is None:
            import llguidance

            self._ll = llguidance.LLTokenizer(self.tokenizer_json(), n_vocab=self.vocab_size, eos_token=self.ll_eos)
        return self._ll

    def compile(self, grammar: str):
        """An llguidance matcher for `grammar`, checked within its limits up to its first mask; or an
        InvalidRequestError that says why not (without quoting the grammar). Each sequence decoding
        under it gets a copy (`constraint`)."""
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=limits())
        eos = self.ll_eos
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if (error := first_error(matcher, eos_ids)) is not None:
            raise InvalidRequestError(f"response_format: the grammar is not valid: {describe(error)}")
        return matcher

    def constraint(self, matcher, prompt_len: int) -> Constraint:
        """A sequence's grammar state: a copy of a compiled matcher, at its start."""
        return Constraint(matcher.deep_copy(), prompt_len, self.vocab_size)


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
        self.single_choice: set[int] = set()  # output positions where the grammar allowed one token

    def fork(self) -> Constraint:
        """An independent copy in the same state (a request's other samples, n > 1)."""
        other = Constraint(self.matcher.deep_copy(), self.prompt_len, self.vocab_size)
        other.consumed, other.real = list(self.consumed), list(self.real)
        other.single_choice = set(self.single_choice)
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
                error = self.matcher.get_error()
                if "doesn't satisfy the grammar" not in error:  # llguidance's words for a forbidden token
                    raise InvalidRequestError(
                        f"response_format: the grammar went past a limit of the grammar "
                        f"engine at output token {len(self.consumed)}: {describe(error)}"
                    )
                # A token the grammar forbids got into the output (a forced token of a counterfactual,
                # or a replayed prefix): nothing after it can be constrained.
                raise InvalidRequestError(
                    f"the output breaks the response_format grammar at output token "
                    f"{len(self.consumed)} (id {token}): {describe(error)}"
                )
            self.consumed.append(token)
            self.real.append(real)

    def allowed(self, context: Sequence[int]) -> torch.Tensor:
        """A bool tensor over the vocabulary: which tokens may follow `context`."""
        self._follow(list(context[self.prompt_len :]))
        started = time.perf_counter()
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))
        self.mask_seconds += time.perf_counter() - started
        self.masks += 1
        if int(allowed.sum()) == 1:  # the grammar leaves one choice: the token's origin is "grammar"
            self.single_choice.add(len(context) - self.prompt_len)
        if self.matcher.is_error():
            raise InvalidRequestError(f"response_format: the grammar failed: {describe(self.matcher.get_error())}")
        return allowed

    def apply(self, logits: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
        """`logits` with every token the grammar forbids after `context` set to -inf."""
        allowed = self.allowed(context).to(logits.device)
        n = min(len(allowed), logits.shape[-1])
        out = logits.float().clone()
        out[..., :n] = out[..., :n].masked_fill(~allowed[:n], float("-inf"))
        out[..., n:] = float("-inf")  # the model's padding rows beyond the tokenizer's vocabulary
        return out
