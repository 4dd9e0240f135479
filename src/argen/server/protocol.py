"""The OpenAI API's request and response bodies, as pydantic models (they also make the OpenAPI
schema). Fields OpenAI defines but argen does not implement are accepted only at their neutral
value, so a request never silently means something else; unknown fields are rejected (422).

Request bodies are strict: a JSON value must have the field's type ("8" is not an integer, "yes"
and 1 are not booleans, true is not a token id), except that a JSON integer is a number (1 for a
temperature); NaN and Infinity, which Python's JSON reader accepts, are not numbers here (422)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from argen.logprobs import MAX_TOP_LOGPROBS
from argen.sampling import LOGIT_BIAS_ENTRIES

SEED_MAX = 2**63 - 1
# What the schema advertises for OpenAI fields argen does not implement. The models still accept any
# value of the field's type, so that a value out of range gets a 400 saying what to do instead.
ONLY_0 = {"minimum": 0, "maximum": 0}
ONLY_1 = {"minimum": 1, "maximum": 1}


STRICT = ConfigDict(strict=True, allow_inf_nan=False)
MAX_STOP = 4  # as OpenAI's API: each stop string is searched for after every token


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", **STRICT)


class StreamOptions(_Body):
    include_usage: bool = False


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
MAX_TOOLS = 128


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="which call a tool message answers")


class JSONSchemaFormat(_Body):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's text / json_object / json_schema, and argen's regex and (Lark) grammar."""

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JSONSchemaFormat | None = None
    regex: str | None = Field(None, description="argen extension: the output matches this regular expression")
    grammar: str | None = Field(None, description="argen extension: a Lark grammar (llguidance's dialect)")

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        return out | {k: v for k in ("regex", "grammar") if (v := getattr(self, k)) is not None}


class FunctionDef(_Body):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="the arguments' JSON schema")
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class StrategySpec(BaseModel):
    """An argen decoding strategy: its name plus its options (see `argen models`)."""

    model_config = ConfigDict(extra="allow", **STRICT)  # the options are checked by make_strategy
    name: str


class PressSpec(BaseModel):
    """An argen KV-cache press: its name plus its options (budget, ...; see `argen models`)."""

    model_config = ConfigDict(extra="allow", **STRICT)  # the options are checked by make_press
    name: str


class _Sampling(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="the served model's id (GET /v1/models)")
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        None, description="new tokens at most (default 256, capped by the context); over the server's limit: 400; "
                          "0 only with echo (prompt scoring)"
    )
    temperature: Annotated[float, Field(ge=0, le=2)] = Field(1.0, description="0 (or below 1e-5) means greedy")
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1)] = Field(
        1, description="samples of the prompt (choices 0..n-1, the prompt prefilled once); sample i uses seed + i, "
                       "returned as the choice's seed; at most the server's limit, and n x max_tokens at most its "
                       "max_tokens limit")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        max_length=MAX_STOP)] | None = Field(None, description=f"a string, or a list of at most {MAX_STOP}")
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    presence_penalty: float = Field(0.0, description="not supported: only 0 (use repetition_penalty)",
                                    json_schema_extra=ONLY_0)
    frequency_penalty: float = Field(0.0, description="not supported: only 0 (use repetition_penalty)",
                                     json_schema_extra=ONLY_0)
    logit_bias: dict[str, float] | None = Field(
        None, description=f"token id (a decimal string) -> a number in [-100, 100] added to its logit before sampling; "
                          f"at most {LOGIT_BIAS_ENTRIES} tokens", json_schema_extra={"maxProperties": LOGIT_BIAS_ENTRIES})
    user: str | None = None
    # argen extensions
    top_k: Annotated[int, Field(ge=0)] = Field(0, description="argen extension: 0 turns it off")
    min_p: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="argen extension")
    repetition_penalty: Annotated[float, Field(gt=0)] = Field(1.0, description="argen extension: 1 turns it off")
    ignore_eos: bool = Field(False, description="argen extension: keep generating past the end-of-sequence token")
    strategy: str | StrategySpec = Field(
        "plain",
        description='argen extension: a decoding strategy, a name or {"name": ..., option: value, ...}',
    )
    press: str | PressSpec | None = Field(
        None, description='argen extension: a KV-cache press, a name or {"name": ..., "budget": fraction kept, ...}',
    )
    return_token_ids: bool = Field(False, description="argen extension: add token ids to the choices")
    response_format: ResponseFormat | None = Field(
        None, description="structured output: json_object, json_schema, or (argen extensions) regex, grammar")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="one prompt: text (tokenized as it is, no chat template) or token ids"
    )
    echo: bool = Field(False, description="the text starts with the prompt (and with logprobs, so do the logprobs: "
                                          "the prompt tokens' under the model, the first one null)")
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="each token's log-prob, with this many most likely alternatives in top_logprobs (plus "
                          "the chosen token)")
    suffix: str | None = Field(None, description="not supported: only null", json_schema_extra={"type": "null"})
    best_of: int | None = Field(None, description="not supported: only null or 1", json_schema_extra=ONLY_1)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" when tools are given (calls parsed from the output), "required" or a named '
                          "function (the output constrained to a call)")
    parallel_tool_calls: bool | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="same as max_tokens")
    logprobs: bool = Field(False, description="each output token's log-prob in choices[].logprobs.content")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="with logprobs: this many most likely alternatives per token")


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape, one entry per token. Log-probs are of the distribution each token was
    drawn from (after the sampling processors; see argen/logprobs.py); -9999 stands for -infinity."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = None
    seed: int | None = None  # argen extension: this choice's seed, to replay it alone


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    token_ids: list[int] | None = None
    seed: int | None = None  # argen extension: this choice's seed, to replay it alone


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCall):
    index: int = 0


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    token_ids: list[int] | None = None
    seed: int | None = None  # argen extension: this choice's seed, to replay it alone


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "argen"
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "draining"]
    model: str
    running: int
    waiting: int


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict without the argen-only fields nobody asked for (token_ids: None)."""
    data = model.model_dump(mode="json")
    for choice in data.get("choices", []):
        for extension in ("token_ids", "seed"):
            if choice.get(extension) is None:
                choice.pop(extension, None)
        if "message" in choice and choice["message"].get("tool_calls") is None:
            choice["message"].pop("tool_calls", None)
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data
