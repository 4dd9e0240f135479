"""GET /v1/argen/strategies (an argen extension): each strategy and KV-cache press this server
offers, with its options' defaults and this server's caps on them (server/limits.py, `--limit`), so
a client (the web page, server/static/) offers only what the server would accept."""

from __future__ import annotations

import inspect
import sys

from fastapi import APIRouter

from argen.cache.press import PRESSES, press_options
from argen.engine.request import ORIGINS
from argen.logprobs import MAX_TOP_LOGPROBS
from argen.server import protocol as p
from argen.server.limits import OPTION_LIMITS, PRESS_LIMITS
from argen.server.state import Served, ServerState
from argen.strategies import REGISTRY, strategy_options

router = APIRouter()

# The constructors' annotations (strings: the modules use `from __future__ import annotations`).
_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}


@router.get("/v1/argen/strategies", response_model=p.StrategyList)
async def strategies(served: Served) -> p.StrategyList:
    policy = served.policy
    return p.StrategyList(
        model=served.model_id,
        strategies=[_strategy(cls, served) for cls in REGISTRY.values()],
        presses=[
            p.PressInfo(
                name=name,
                description=_summary(cls),
                options=_options(cls, press_options(cls), PRESS_LIMITS, served),
            )
            for name, cls in PRESSES.items()
        ],
        max_tokens=policy.max_tokens,
        max_n=min(policy.limits.max_n, served.max_batch, policy.max_tokens),
        max_top_logprobs=MAX_TOP_LOGPROBS,
        origins=ORIGINS,
    )


def _strategy(cls, served: ServerState) -> p.StrategyInfo:
    return p.StrategyInfo(
        name=cls.name,
        exact=cls.exact,
        description=_summary(cls),
        options=_options(cls, strategy_options(cls), OPTION_LIMITS, served),
    )


def _options(cls, defaults: dict, capped: dict, served: ServerState) -> list[p.OptionInfo]:
    annotations = inspect.signature(cls.__init__).parameters
    companions = getattr(cls, "companion_options", {})
    caps = served.policy.limits.options
    out = []
    for name, default in defaults.items():
        if name in companions:
            choices = served.policy.companions.names(companions[name])
            out.append(p.OptionInfo(name=name, type="model", default=default, choices=choices))
            continue
        kind = _TYPES.get(str(annotations[name].annotation), "other")
        cap = caps.get(name) if name in capped else None
        numeric = kind in ("integer", "number")
        out.append(
            p.OptionInfo(
                name=name,
                type=kind,
                default=default,
                maximum=cap if numeric else None,
                max_length=None if numeric else cap,
            )
        )
    return out


def _summary(cls) -> str:
    """The first sentence of the class's docstring, else of its module's."""
    text = " ".join((cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").split())
    return text.split(". ")[0].rstrip(".")[:300]
