"""Strategy registry: names -> classes, and `make_strategy` for the name / dict / object forms."""

from __future__ import annotations

import inspect

from argen.checks import finite_number
from argen.errors import InvalidRequestError
from argen.strategies.base import DecodeState, Strategy
from argen.strategies.bild import BiLD
from argen.strategies.caad import CAAD
from argen.strategies.fs_gen import FSGen
from argen.strategies.guided import Guided
from argen.strategies.plain import Plain
from argen.strategies.search import Beam, ConditionalBeam, Contrastive
from argen.strategies.skipping import FFNSkip, SkipDecode
from argen.strategies.speculative import DraftHead, DraftModel, Jacobi, LayerSkip, NGram, PromptLookup
from argen.strategies.srgen import SRGen
from argen.strategies.superposed import Superposed

REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    REGISTRY[cls.name] = cls
    return cls


for _cls in (
    Plain,
    PromptLookup,
    NGram,
    Jacobi,
    LayerSkip,
    DraftModel,
    DraftHead,
    Beam,
    ConditionalBeam,
    Contrastive,
    Guided,
    SkipDecode,
    FFNSkip,
    Superposed,
    CAAD,
    SRGen,
    BiLD,
    FSGen,
):
    register(_cls)


def strategy_options(cls: type[Strategy]) -> dict[str, object]:
    """Option name -> default, read from the constructor's signature."""
    params = inspect.signature(cls.__init__).parameters
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {n: p.default for n, p in params.items() if n != "self" and p.kind in kinds}


def make_strategy(spec) -> Strategy:
    """A strategy from a name (`"plain"`), a dict (`{"name": "prompt-lookup", "max_draft": 8}`) or
    an object (returned as is)."""
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise InvalidRequestError(
            f"a strategy is a name, a dict with 'name' and its options, or a Strategy object; got {spec!r}"
        )
    options = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name not in REGISTRY:
        raise InvalidRequestError(f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    valid = strategy_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k} (default {v!r})" for k, v in valid.items()) or "none"
        raise InvalidRequestError(f"unknown option(s) {', '.join(unknown)} for strategy {name!r}; valid: {listed}")
    annotations = inspect.signature(cls.__init__).parameters
    for key, value in options.items():
        problem = _type_problem(value, annotations[key].annotation)
        if problem:
            raise InvalidRequestError(
                f"option {key} of strategy {name!r} must be {problem} (default {valid[key]!r}); got {value!r}"
            )
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"bad option for strategy {name!r}: {exc}") from exc


def _type_problem(value, annotation) -> str | None:
    """What `value` should be, judged by the option's annotation when it is a plain int, float or
    bool, or None if it fits. Options from the CLI or JSON arrive as JSON values: 2.5 for an integer
    option must not reach `range()` as a traceback, 3 for a flag must not silently mean True, and
    NaN or Infinity (which Python's JSON reader accepts) must not reach the arithmetic."""
    is_bool = isinstance(value, bool)
    if annotation in ("bool", bool):
        return None if is_bool else "true or false"
    if annotation in ("int", int):
        return None if isinstance(value, int) and not is_bool else "an integer"
    if annotation in ("float", float):
        return None if finite_number(value) is not None else "a finite number"
    return None  # unions, lists, objects: the constructor checks those


__all__ = ["REGISTRY", "DecodeState", "Strategy", "make_strategy", "register", "strategy_options"]
