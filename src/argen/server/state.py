"""What the routes of one app share: a `ServerState` (`app.state.served`), handed to each route by
the `Served` dependency (FastAPI's way to give module-level routers their app's objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends
from fastapi import Request as HTTPRequest

from argen.api import Generator
from argen.images import ImageGenerator
from argen.server import protocol as p
from argen.server.edits import ServedPrompts
from argen.server.grammar_sandbox import GrammarSandbox
from argen.server.logprob_shape import Tokens
from argen.server.metrics import Metrics
from argen.server.params import Policy
from argen.server.scheduler import Scheduler


@dataclass
class ServerState:
    gen: Generator
    model_id: str
    policy: Policy
    scheduler: Scheduler
    metrics: Metrics
    grammars: GrammarSandbox
    tokens: Tokens  # token texts and bytes, for log-probs
    card: p.ModelCard
    tokenizer_info: dict
    max_batch: int
    max_queue: int
    image_models: dict[str, ImageGenerator] = field(default_factory=dict)  # /v1/images/generations
    prompts: ServedPrompts = field(default_factory=ServedPrompts)  # what a prompt edit may name


def served(request: HTTPRequest) -> ServerState:
    return request.app.state.served


Served = Annotated[ServerState, Depends(served)]


def endpoint_of(path: str) -> str:
    """The `endpoint` label of a path in the request metrics."""
    return "chat" if path.endswith("/chat/completions") else "completions" if path.endswith("/completions") else "other"
