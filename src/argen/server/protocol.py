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
from pydantic.json_schema import JsonDict

from argen.logprobs import MAX_TOP_LOGPROBS
from argen.sampling import LOGIT_BIAS_ENTRIES

SEED_MAX = 2**63 - 1
# What the schema advertises for OpenAI fields argen does not implement. The models still accept any
# value of the field's type, so that a value out of range gets a 400 saying what to do instead.
ONLY_1: JsonDict = {"minimum": 1, "maximum": 1}


STRICT = ConfigDict(strict=True, allow_inf_nan=False)
# Each stop string is looked for after every token (OpenAI allows 4, vLLM any number; lm-eval sends
# more than 4): their number and length bound that work.
MAX_STOP, MAX_STOP_CHARS = 32, 256
MAX_STOP_TOKEN_IDS = 256
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each is admitted as a request of its own)
MAX_ID_CHARS = 256  # `user`: an end-user id, accepted and ignored
# A prompt edit (`edit`, argen's extension): the replacement's size (the edited prompt must still fit
# the context, checked as any prompt is) and the span's ends (checked against the prompt once known).
MAX_EDIT_CHARS, MAX_EDIT_TOKENS, MAX_EDIT_OFFSET = 65_536, 16_384, 2**31 - 1
# `metadata` (accepted, ignored, never stored), bounded as OpenAI bounds it
METADATA_ENTRIES, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", **STRICT)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM's: every chunk carries the usage so far")


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # calls one output may make under tool_choice "required" with parallel_tool_calls


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


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Sampling(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="the served model's id (GET /v1/models)")
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="new tokens at most (default 256, capped by the context); over the server's limit: 400; "
        "0 only with echo (prompt scoring)",
    )
    temperature: Annotated[float, Field(ge=0, le=2)] = Field(1.0, description="0 (or below 1e-5) means greedy")
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1)] = Field(
        1,
        description="samples of the prompt (choices 0..n-1, the prompt prefilled once); sample i uses seed + i, "
        "returned as the choice's seed; at most the server's limit, and n x max_tokens at most its "
        "max_tokens limit",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None,
        description=f"a string, or a list of at most {MAX_STOP} (each 1-{MAX_STOP_CHARS} characters): the output "
        "ends before the first one it holds",
    )
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = Field(
        0.0, description="subtracted from the logit of every token the output already holds (OpenAI's)"
    )
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = Field(
        0.0, description="subtracted from a token's logit once per time the output already holds it (OpenAI's)"
    )
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None,
        description="vLLM's: the output also ends at any of these token ids (kept in token_ids, their text left "
        "out unless include_stop_str_in_output)",
    )
    min_tokens: Annotated[int, Field(ge=0)] = Field(
        0,
        description="vLLM's: until this many tokens are out, EOS and stop_token_ids are banned and stop strings are "
        "not looked for; at most max_tokens",
    )
    include_stop_str_in_output: bool = Field(
        False, description="vLLM's: the text keeps the stop string or stop token that ended it"
    )
    skip_special_tokens: bool = Field(True, description="vLLM's: false shows special tokens in the text")
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None,
        description="vLLM's: each prompt token's log-prob under the model (the first null), with this many "
        "alternatives, as {token id: {logprob, rank, decoded_token}}; not with stream",
    )
    logit_bias: dict[str, float] | None = Field(
        None,
        description=f"token id (a decimal string) -> a number in [-100, 100] added to its logit before sampling; "
        f"at most {LOGIT_BIAS_ENTRIES} tokens",
        json_schema_extra={"maxProperties": LOGIT_BIAS_ENTRIES},
    )
    user: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = Field(None, description="accepted and ignored")
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
        None,
        description='argen extension: a KV-cache press, a name or {"name": ..., "budget": fraction kept, ...}',
    )
    return_token_ids: bool = Field(False, description="argen extension: add token ids to the choices")
    return_origins: bool = Field(
        False,
        description="argen extension: add each token's origin (token_origins: step, draft, verify, grammar, "
        "forced, replayed, press) and the decode statistics (stats: passes, drafts accepted, tokens/s; bild and fs-gen: "
        "strategy_record, the large model's share) to the choices; "
        "a stream sends each choice's stats in a chunk of its own (argen_stats) when it finishes",
    )
    response_format: ResponseFormat | None = Field(
        None, description="structured output: json_object, json_schema, or (argen extensions) regex, grammar"
    )


class PromptEditBody(_Body):
    """Characters (token ids, for a prompt of ids) [start, end) of `prompt` replaced by `text` (`tokens`)."""

    start: Annotated[int, Field(ge=0, le=MAX_EDIT_OFFSET)]
    end: Annotated[int, Field(ge=0, le=MAX_EDIT_OFFSET)]
    text: Annotated[str, Field(max_length=MAX_EDIT_CHARS)] = ""
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_EDIT_TOKENS)] | None = None


class EditReport(BaseModel):
    """What a prompt edit reused of its prefill (argen extension)."""

    prompt_tokens: int
    cached_tokens: int = Field(description="positions before the edit taken from the prefix cache")
    moved_tokens: int = Field(description="positions after the edit whose cached keys moved (PIE), not computed")
    prefill_saved: float = Field(description="the share of the prefill not computed")
    fallback: str | None = Field(description="why nothing moved, when the previous prompt's blocks were not cached")


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | list[int]
        | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(
        description=f"a prompt, text (tokenized as it is, no chat template) or token ids, or a list of at most "
        f"{MAX_PROMPTS} prompts (choice i x n + j is sample j of prompt i)"
    )
    echo: bool = Field(
        False,
        description="the text starts with the prompt (and with logprobs, so do the logprobs: "
        "the prompt tokens' under the model, the first one null)",
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None,
        description="each token's log-prob, with this many most likely alternatives in top_logprobs (plus "
        "the chosen token)",
    )
    suffix: str | None = Field(None, description="not supported: only null", json_schema_extra={"type": "null"})
    best_of: int | None = Field(None, description="not supported: only null or 1", json_schema_extra=ONLY_1)
    edit: PromptEditBody | None = Field(
        None,
        description="argen extension (PIE): `prompt` is one this server served before, and the completion is "
        "for it edited; its cached keys after the edit are reused, moved to their new positions, instead of "
        "being computed (lossy: they keep the old prompt's context). `argen_edit` in the response says what "
        "was reused, or why nothing was (the previous prompt's blocks evicted: a full prefill)",
    )


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description='"auto" when tools are given (calls parsed from the output), "required" or a named '
        "function (the output constrained to a call)",
    )
    parallel_tool_calls: bool | None = Field(
        None,
        description=f'with tool_choice "required": true lets the output be several calls (up to '
        f"{MAX_PARALLEL_CALLS}); otherwise one",
    )
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="same as max_tokens")
    logprobs: bool = Field(False, description="each output token's log-prob in choices[].logprobs.content")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="with logprobs: this many most likely alternatives per token"
    )
    add_generation_prompt: bool = Field(True, description="the chat template opens the assistant's turn")
    continue_final_message: bool = Field(
        False,
        description="the last message (an assistant's, partial) is continued, not closed; not with "
        "add_generation_prompt",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="variables for the chat template (e.g. enable_thinking), bounded: see SECURITY.md"
    )
    # Accepted and ignored (SECURITY.md says what each would mean and why it has none here)
    store: bool | None = Field(None, description="ignored: argen stores nothing")
    metadata: (
        Annotated[
            dict[
                Annotated[str, Field(max_length=METADATA_KEY_CHARS)],
                Annotated[str, Field(max_length=METADATA_VALUE_CHARS)],
            ],
            Field(max_length=METADATA_ENTRIES),
        ]
        | None
    ) = Field(None, description="ignored")
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = Field(
        None, description="ignored: one tier"
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="ignored: the model does not reason apart from its answer"
    )


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a `prompt` (text as /v1/completions tokenizes it) or `messages` (through the
    chat template, as /v1/chat/completions does); one of the two."""

    model: str | None = Field(None, description="the served model's id, if given")
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = Field(
        None,
        description="prompt: add the tokenizer's special tokens (default "
        "true); messages: only false (the template adds them)",
    )
    return_token_strs: bool = Field(False, description="also each token's string")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model: str | None = Field(None, description="the served model's id, if given")
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="token ids, at most the model's context of them")


class DetokenizeResponse(BaseModel):
    prompt: str


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


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry: one token of a prompt position, the prompt's own or an alternative."""

    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # per prompt token, keyed by token id; the first null


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = None
    seed: int | None = None  # argen extension: this choice's seed, to replay it alone
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's
    token_origins: list[str] | None = None  # argen extension (return_origins): each token's origin
    stats: dict[str, Any] | None = None  # argen extension (return_origins): how the choice was decoded


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    argen_stats: dict[str, Any] | None = None  # argen extension: a finished choice's stats (a stream's)
    argen_edit: EditReport | None = None  # argen extension: what a prompt edit reused


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
    token_origins: list[str] | None = None  # argen extension (return_origins): each token's origin
    stats: dict[str, Any] | None = None  # argen extension (return_origins): how the choice was decoded


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's


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
    token_origins: list[str] | None = None  # argen extension (return_origins): each token's origin


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    argen_stats: dict[str, Any] | None = None  # argen extension: a finished choice's stats


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
    for extension in ("prompt_logprobs", "argen_stats", "argen_edit"):
        if extension in data and data[extension] is None:
            del data[extension]
    for choice in data.get("choices", []):
        for extension in ("token_ids", "seed", "prompt_logprobs", "token_origins", "stats"):
            if choice.get(extension) is None:
                choice.pop(extension, None)
        if "message" in choice and choice["message"].get("tool_calls") is None:
            choice["message"].pop("tool_calls", None)
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


# -- /v1/images/generations (OpenAI's images API, for the image-token models: argen.images) --------
MAX_IMAGES = 16  # images in one request (labels x n): one request's work stays a fraction of a second


class ImageGenerationRequest(_Body):
    """OpenAI's image request, for the digits models: `prompt` names the class ("7"), or argen's
    `labels` gives one class per image; `n` images of each. `strategy` is the image decoder
    (GET /v1/models lists the served image models; their strategies: docs/images.md)."""

    model: str = Field(max_length=MAX_ID_CHARS, description="a served image model's id (GET /v1/models)")
    prompt: str | None = Field(None, max_length=64, description="the class of the images, as its digits: '7'")
    labels: list[Annotated[int, Field(ge=0, le=1_000_000)]] | None = Field(
        None, min_length=1, max_length=MAX_IMAGES, description="argen: one class per image (instead of prompt)"
    )
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    strategy: str | StrategySpec | None = Field(None, description="argen: the image decoder and its options")
    response_format: Literal["b64_json", "pixels"] = Field(
        "b64_json", description="b64_json: a PNG each; pixels (argen): the grey levels as rows of integers"
    )
    size: str | None = Field(None, max_length=16, description="accepted only as the model's own size, e.g. '8x8'")
    user: str | None = Field(None, max_length=MAX_ID_CHARS, description="accepted and ignored")


class ImageData(BaseModel):
    b64_json: str | None = None
    pixels: list[list[int]] | None = None  # argen: grey levels 0..levels-1, one list per row
    label: int  # argen: the class the image was asked for
    revised_prompt: None = None


class ImageStats(BaseModel):
    """argen: what decoding the request's images cost."""

    strategy: dict[str, Any]
    seed: int
    target_passes_per_image: float
    draft_passes_per_image: float
    seconds: float


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    argen: ImageStats


class OptionInfo(BaseModel):
    """One option of a strategy or a press (GET /v1/argen/strategies)."""

    name: str
    type: Literal["integer", "number", "boolean", "string", "model", "other"]
    default: Any = None
    maximum: int | None = None  # this server's cap on the value (an integer option), from --limit
    max_length: int | None = None  # this server's cap on the length (a string or list option)
    choices: list[str] | None = None  # the model names a companion option may take on this server


class StrategyInfo(BaseModel):
    name: str
    exact: bool  # reproduces plain decoding (greedy: token for token; sampling: in distribution)
    description: str
    options: list[OptionInfo]


class PressInfo(BaseModel):
    name: str
    description: str
    options: list[OptionInfo]


class StrategyList(BaseModel):
    """What this server offers and allows: its strategies and KV-cache presses with their options,
    defaults and caps, the request-wide caps, and what each token origin (return_origins) means."""

    object: Literal["argen.strategies"] = "argen.strategies"
    model: str
    strategies: list[StrategyInfo]
    presses: list[PressInfo]
    max_tokens: int
    max_n: int
    max_top_logprobs: int
    origins: dict[str, str]
