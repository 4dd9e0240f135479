"""Tool calling for the chat endpoint: OpenAI's `tools` + `tool_choice`, on top of structured output.

- a named function (`{"type": "function", "function": {"name": ...}}`): the output is constrained to
  that function's arguments (its `parameters` JSON schema) and returned as one tool call;
- `"required"`: the output is constrained to `{"name": <one of the tools>, "arguments": {...}}`
  with the arguments matching that tool's schema, and returned as one tool call; with
  `parallel_tool_calls: true`, to a list of 1 to MAX_PARALLEL_CALLS such objects (several calls);
- `"auto"` (OpenAI's default when tools are given): unconstrained; the model's own call syntax, a
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>` block (Hermes', which SmolLM2 was tuned
  on) or a bare such object, is parsed into tool calls, anything else is the message's content;
- `"none"`: the tools are ignored.

The tools are described in the system message (with the call syntax above), so the model knows
what it may call whatever its chat template does with tools (the default model's ignores them).
A function without `parameters` (or with `{}`) takes no arguments, as OpenAI defines it: its
arguments are `{}`, and a forced call's grammar allows nothing else (an open object would let a
model write keys until max_tokens).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from argen.server import protocol as p
from argen.server.errors import bad_request

CALL_BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolMode:
    """How a chat request's output turns into a message: `forced` names the function whose
    arguments the whole output is (a named tool_choice); `required`: the output is one
    {"name", "arguments"} object; `auto`: calls are parsed out of free text, if any."""

    names: tuple[str, ...]
    forced: str | None = None
    required: bool = False
    parallel: bool = False  # required: the output is a list of calls

    @property
    def auto(self) -> bool:
        return self.forced is None and not self.required


def tool_mode(body: p.ChatCompletionRequest) -> ToolMode | None:
    """The request's tool mode (None: no tools in play), or a 400 if tools and tool_choice disagree."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools; give tools or leave tool_choice out", "tool_choice")
        return None
    names = tuple(t.function.name for t in body.tools)
    if len(set(names)) != len(names):
        raise bad_request("tools holds two functions with the same name; give each a distinct name", "tools")
    if choice == "none":
        return None
    if isinstance(choice, p.NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, which is not among the tools ({', '.join(names)})",
                "tool_choice",
            )
        mode = ToolMode(names, forced=choice.function.name)
    else:
        mode = ToolMode(
            names, required=choice == "required", parallel=choice == "required" and bool(body.parallel_tool_calls)
        )
    if body.response_format is not None and body.response_format.type != "text" and not mode.auto:
        raise bad_request(
            "a tool_choice that forces a call fixes the output's format; leave response_format out", "response_format"
        )
    return mode


def response_format(body: p.ChatCompletionRequest, mode: ToolMode) -> dict | None:
    """The output's grammar, as a response_format, for a mode that forces a call (None for auto)."""
    params = {t.function.name: parameters(t.function) for t in body.tools or []}
    if mode.forced is not None:
        schema = params[mode.forced]
    elif mode.required:
        schema = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for name, parameters in params.items()
            ]
        }
        if mode.parallel:
            schema = {"type": "array", "items": schema, "minItems": 1, "maxItems": p.MAX_PARALLEL_CALLS}
    else:
        return None
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}


def parameters(function: p.FunctionDef) -> dict:
    """A function's arguments schema: none given (or `{}`) means no arguments."""
    return function.parameters or NO_ARGUMENTS


def describe(tools: list[p.Tool]) -> str:
    """The tools, told to a model whose chat template does not render them."""
    listed = "\n".join(
        json.dumps(t.function.model_dump(exclude_none=True, by_alias=True) | {"parameters": parameters(t.function)})
        for t in tools
    )
    return (
        "You can call these functions. To call one, answer with "
        '<tool_call>{"name": <function name>, "arguments": <arguments as JSON>}</tool_call>.\n' + listed
    )


def calls_from_output(text: str, mode: ToolMode) -> tuple[str | None, list[p.ToolCall]]:
    """(the message's content, its tool calls) for a finished output under `mode`."""
    if mode.forced is not None:
        return None, [_call(mode.forced, text)]
    if mode.required:
        try:
            obj = json.loads(text)
            objs = obj if mode.parallel else [obj]
            return None, [_call(o["name"], json.dumps(o["arguments"])) for o in objs]
        except (ValueError, KeyError, TypeError):
            return text, []  # cut short (max_tokens): what there is, as text
    calls = []
    for block in CALL_BLOCK.findall(text) or ([text.strip()] if text.strip().startswith("{") else []):
        try:
            obj = json.loads(block)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("name") in mode.names and isinstance(obj.get("arguments", {}), dict):
            calls.append(_call(obj["name"], json.dumps(obj.get("arguments", {}))))
    if not calls:
        return text, []
    rest = CALL_BLOCK.sub("", text).strip()
    return (rest or None) if CALL_BLOCK.search(text) else None, calls


def _call(name: str, arguments: str) -> p.ToolCall:
    return p.ToolCall(id=p.new_id("call"), function=p.FunctionCall(name=name, arguments=arguments))
