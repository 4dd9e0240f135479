"""An OpenAI request body -> an argen Request (prompt ids, SamplingParams, strategy), with every
check that can fail done here, before the request is queued: errors are 400s that say what to fix.

`build_request` tokenizes, so the app runs it in a worker thread, off the event loop. The cheap
checks come first: text that is not valid Unicode, and a prompt whose characters could not fit the
context even if every token were the vocabulary's longest, are refused before tokenizing."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pydantic import BaseModel

from argen.api import Generator, token_ngrams
from argen.cache.press import Press, make_press
from argen.engine import Request
from argen.errors import InvalidRequestError
from argen.prompt_edit import PromptEdit
from argen.sampling import SamplingParams, checked_logit_bias
from argen.server import tools
from argen.server.companions import Companions
from argen.server.edits import ServedPrompts
from argen.server.errors import APIError, bad_request
from argen.server.limits import Limits
from argen.server.protocol import SEED_MAX, ChatCompletionRequest, CompletionRequest
from argen.server.tools import tool_mode
from argen.strategies import REGISTRY, make_strategy

DEFAULT_MAX_TOKENS = 256
MAX_MESSAGES = 2048  # messages in one chat request (OpenAI's own bound)


@dataclass(frozen=True)
class Policy:
    """What this server allows a request (built once by `create_app`)."""

    model_id: str
    max_tokens: int  # the largest max_tokens a request may ask for
    limits: Limits
    companions: Companions
    max_chars: int  # more characters of prompt text than this cannot fit the context
    max_batch: int = 32  # sequences decoding at once: a request's n samples are n of them


def max_prompt_chars(gen: Generator) -> int:
    """Characters of text beyond which a prompt is longer than the context for sure: the context
    times the longest token's length (vocabulary entries are at least as long as the text they
    stand for: byte-level entries spell each byte as one character)."""
    longest = max(map(len, gen.tokenizer.get_vocab()), default=1)
    return gen.runtime.info.max_positions * max(1, longest)


def build_request(
    gen: Generator, body: CompletionRequest | ChatCompletionRequest, policy: Policy, compile_grammar: bool = True
) -> Request:
    """The Request of a body that holds one prompt (a list of several: a 400 naming `prompt`)."""
    requests = build_requests(gen, body, policy, compile_grammar=compile_grammar)
    if len(requests) != 1:
        raise bad_request(f"prompt holds {len(requests)} prompts; send one prompt here", "prompt")
    return requests[0]


def build_requests(
    gen: Generator,
    body: CompletionRequest | ChatCompletionRequest,
    policy: Policy,
    compile_grammar: bool = True,
    served: ServedPrompts | None = None,
) -> list[Request]:
    """One Request per prompt (a completions body may hold a list of them), every one checked: the
    whole body is refused if any prompt is. `compile_grammar=False` leaves the grammar (if any) to be
    compiled by the caller: the server's grammar sandbox. `served`: the prompts an `edit` may name
    (None: edits are not taken, as in batch jobs)."""
    _check_text(body)
    if body.model != policy.model_id:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; this server serves {policy.model_id!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    _check_unsupported(body)
    prompts = _prompts_ids(gen, body, policy.max_chars)
    edit_of = None
    if isinstance(body, CompletionRequest) and body.edit is not None:
        edit_of, prompts = prompts[0], [_edited_ids(gen, body, policy.max_chars, prompts, served)]
    context = gen.runtime.info.max_positions
    where = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    for i, prompt_ids in enumerate(prompts):
        which = where if len(prompts) == 1 else f"{where} {i}"
        if not prompt_ids:
            raise bad_request(f"the {which} is empty once tokenized; give at least one token", where)
        if len(prompt_ids) >= context:
            raise bad_request(
                f"the {which} has {len(prompt_ids)} tokens but the model's context is {context} tokens; "
                f"shorten it to at most {context - 1} tokens",
                where,
                code="context_length_exceeded",
            )
    asked = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        asked = body.max_completion_tokens
    if asked is not None and asked > policy.max_tokens:
        raise bad_request(
            f"max_tokens is {asked} but this server allows at most {policy.max_tokens}; ask for fewer", "max_tokens"
        )
    echo = isinstance(body, CompletionRequest) and body.echo
    if asked == 0 and not echo:
        raise bad_request(
            "max_tokens 0 generates nothing; ask for at least 1 (0 is for scoring a prompt: "
            "/v1/completions with echo: true and logprobs)",
            "max_tokens",
        )
    longest = max(map(len, prompts))
    room = context - longest
    _check_n(body, asked, policy, len(prompts))
    if asked is not None and asked > room:
        which = where if len(prompts) == 1 else f"longest {where}"
        raise bad_request(
            f"the model's context is {context} tokens and the {which} uses {longest}, so "
            f"max_tokens can be at most {room}; you asked for {asked}",
            "max_tokens",
            code="context_length_exceeded",
        )
    default = min(DEFAULT_MAX_TOKENS, policy.max_tokens // (body.n * len(prompts)), room)
    # echo + logprobs: the prompt's tokens are scored too (their logits computed in the prefill), as
    # with prompt_logprobs (vLLM's); one scoring serves both, with the most alternatives either asks for.
    scored = [k for k in (body.logprobs if echo else None, body.prompt_logprobs) if k is not None]
    requests = []
    for prompt_ids in prompts:
        params = _sampling_params(body, asked if asked is not None else default)
        strategy = _strategy(gen, body, policy)
        try:
            strategy.check(gen.runtime, len(prompt_ids), params)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), "strategy") from exc
        request = Request(
            prompt_ids,
            params,
            strategy,
            n=body.n,
            prompt_logprobs=max(scored, default=None),
            press=_press(body, policy),
            edit_of=edit_of,
        )
        try:
            gen.engine.validate(request, compile_grammar=compile_grammar)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), _param_of(str(exc), where)) from exc
        requests.append(request)
    return requests


def _edited_ids(
    gen: Generator, body: CompletionRequest, max_chars: int, prompts: list[list[int]], served: ServedPrompts | None
) -> list[int]:
    """The token ids of `body.prompt` edited by `body.edit`, once the edit is known to name one prompt
    this server served."""
    edit = body.edit
    assert edit is not None  # called for a body with an edit
    if served is None:
        raise bad_request("prompt edits are taken by the server's /v1/completions only", "edit")
    if len(prompts) != 1 or not isinstance(body.prompt, str) and not all(isinstance(t, int) for t in body.prompt):
        raise bad_request("an edit applies to one prompt (text or token ids), not a list of prompts", "edit")
    if body.echo or body.prompt_logprobs is not None:
        raise bad_request("an edit cannot be combined with echo or prompt_logprobs", "edit")
    if prompts[0] not in served:
        raise bad_request(
            f"edit: this server has not served this prompt (it remembers the last {served.limit} it served); "
            "send it once without edit, then edit it",
            "edit",
            code="unknown_prompt",
        )
    tokens = None if edit.tokens is None else tuple(edit.tokens)
    try:
        new = PromptEdit(edit.start, edit.end, edit.text, tokens).apply(body.prompt)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), "edit") from exc
    if isinstance(new, list):
        return new
    if len(new) > max_chars:
        raise _too_long("prompt", len(new), max_chars, gen.runtime.info.max_positions)
    return gen.encode(new, chat=False) if new else []


def _param_of(message: str, where: str) -> str:
    """The field a check of the Engine's names (its messages start with it), else the prompt."""
    if "stop_token_ids" in message:
        return "stop_token_ids"
    return next((field for field in ("response_format", "logit_bias") if message.startswith(field)), where)


def _sampling_params(body, max_new_tokens: int) -> SamplingParams:
    """The body's SamplingParams (a 400 naming the field a check refuses)."""
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            min_tokens=body.min_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            logit_bias=_logit_bias(body),
            logprobs=_logprobs(body),
            response_format=_response_format(body),
        )
    except InvalidRequestError as exc:
        named = re.match(r"invalid sampling parameter: (\w+)", str(exc))
        param = {"max_new_tokens": "max_tokens"}.get(named[1], named[1]) if named else None
        raise bad_request(
            str(exc), "response_format" if "response_format" in str(exc) and not named else param
        ) from exc


def _check_n(body, asked: int | None, policy: Policy, prompts: int = 1) -> None:
    """n samples are n sequences of the batch, each up to max_tokens long: n is capped, prompts x n x
    max_tokens counts against the server's max_tokens limit (a request's new tokens, all prompts and
    samples together), and every sample's seed (seed + i) must be one a client can send back."""
    cap = min(policy.limits.max_n, policy.max_batch)
    if body.n > cap:
        raise bad_request(
            f"n is {body.n} but this server allows at most {cap} samples per request; ask for fewer "
            "(or send several requests)",
            "n",
            code="limit_exceeded",
        )
    total = prompts * body.n * (asked or 1)
    if total > policy.max_tokens:
        count = f"{prompts} prompts x " if prompts > 1 else ""
        raise bad_request(
            f"{count}n x max_tokens is {count}{body.n} x {asked or 1} = {total} new tokens, but this "
            f"server allows at most {policy.max_tokens} per request, all prompts and samples together; "
            "ask for fewer prompts, samples or tokens",
            "max_tokens" if asked else "n",
            code="limit_exceeded",
        )
    if body.seed is not None and body.seed + body.n - 1 > SEED_MAX:
        raise bad_request(
            f"sample i gets seed + i, so seed + n - 1 must be at most {SEED_MAX}; use a smaller seed", "seed"
        )


def _response_format(body) -> dict | None:
    """The output's grammar: a forced tool call's, else the response_format's."""
    mode = tool_mode(body) if isinstance(body, ChatCompletionRequest) else None
    if mode is not None and not mode.auto:
        return tools.response_format(body, mode)
    return None if body.response_format is None else body.response_format.as_dict()


def _strategy(gen: Generator, body, policy: Policy):
    """The strategy, its companion models named (not loaded: the server loaded them at start),
    its options within the server's limits, prepared (guided: its tokenizer checked)."""
    spec = (
        body.strategy if isinstance(body.strategy, str) else {"name": body.strategy.name, **body.strategy.model_extra}
    )
    spec = {"name": spec} if isinstance(spec, str) else spec
    try:
        cls = REGISTRY.get(spec["name"])
        if cls is not None and cls.companion_options:
            spec = {
                "name": spec["name"],
                **policy.companions.resolve(cls, {k: v for k, v in spec.items() if k != "name"}),
            }
        if cls is not None:
            spec = {
                "name": spec["name"],
                **policy.limits.fit_defaults(cls, {k: v for k, v in spec.items() if k != "name"}),
            }
        strategy = make_strategy(spec)
        if (over := policy.limits.check(strategy)) is not None:
            raise bad_request(over, "strategy", code="limit_exceeded")
        # The companions Companions.resolve put in the options: the operator's loaded models, never a source.
        companions = {option: vars(strategy)[option] for option in type(strategy).companion_options}
        # The n-gram tables of the machine's text (superposed decoding): the server's, never a client's file,
        # and never built for a client (minutes of work): read from the cache, where a command put them.
        ngrams = token_ngrams(strategy, gen.model, build=False)
        if type(strategy).needs_token_ngrams and vars(strategy).get("ngram_weight") and not ngrams:
            raise bad_request(
                f"strategy {strategy.name!r} interpolates with n-gram tables of the server machine's text, and "
                "this server has none built for its model; ask with ngram_weight 0, or its operator builds them "
                "once with `argen generate --strategy superposed --n 2 hi` (same model)",
                "strategy",
            )
        strategy.prepare(gen.model, companions | ngrams)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), "strategy") from exc
    return strategy


def _press(body, policy: Policy) -> Press | None:
    """The KV-cache press the request names (None: none), its options checked and within the limits."""
    if body.press is None:
        return None
    spec = body.press if isinstance(body.press, str) else {"name": body.press.name, **body.press.model_extra}
    try:
        press = make_press(spec)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), "press") from exc
    assert press is not None  # make_press gives None only for no spec
    if (over := policy.limits.check_press(press)) is not None:
        raise bad_request(over, "press", code="limit_exceeded")
    return press


def _check_text(body: BaseModel) -> None:
    """Strings that are not valid Unicode (a lone UTF-16 surrogate such as "\\ud800", which JSON
    allows) break the tokenizer and any message that quotes them: a 400 naming the field."""
    for name, value in body.model_dump().items():
        if (index := _bad_text(value)) is not None:
            raise bad_request(
                f"{name} holds text that is not valid Unicode (a lone surrogate such as \\ud800, "
                f"{index}); send UTF-8 text, or surrogates only in valid pairs",
                name,
                code="invalid_text",
            )


def _bad_text(value) -> str | None:
    """Where in `value` (strings in nested lists and dicts, keys included) a lone surrogate is."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"at character {exc.start}"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if (where := _bad_text(key) if isinstance(key, str) else None) is not None:
            return f"in a field name, {where}"
        if (where := _bad_text(item)) is not None:
            return where
    return None


def _logit_bias(body) -> dict[int, float]:
    """The request's logit_bias, checked (a 400 naming the field if it is not valid)."""
    try:
        return checked_logit_bias(body.logit_bias or {})
    except InvalidRequestError as exc:
        raise bad_request(str(exc), "logit_bias") from exc


def _check_unsupported(body) -> None:
    """OpenAI fields argen does not implement: accepted only at their neutral values."""
    checks = [
        (
            not (body.stream and body.prompt_logprobs is not None),
            "prompt_logprobs",
            "prompt_logprobs cannot be streamed (as vLLM); leave out stream or prompt_logprobs",
        ),
    ]
    if isinstance(body, CompletionRequest):
        checks += [
            (body.suffix is None, "suffix", "suffix is not supported; leave it out"),
            (body.best_of in (None, 1), "best_of", "best_of is not supported (only 1); leave it out"),
        ]
    for ok, param, message in checks:
        if not ok:
            raise bad_request(message, param, code="unsupported_parameter")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")


def _logprobs(body) -> int | None:
    """SamplingParams.logprobs: how many alternatives per output token (None: no log-probs)."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    return (body.top_logprobs or 0) if body.logprobs else None


def _too_long(where: str, chars: int, max_chars: int, context: int) -> APIError:
    return bad_request(
        f"the {where} has {chars} characters, more than any {context}-token context can hold "
        f"(at most {max_chars}); shorten it",
        where,
        code="context_length_exceeded",
    )


def _messages(gen: Generator, body: ChatCompletionRequest) -> list[dict]:
    """The conversation as the chat template takes it: text content; an assistant's earlier tool calls
    written as the calls it made; the tools described in the system message (tools.py)."""
    messages = []
    for m in body.messages:
        text = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        if m.tool_calls:
            text = (text or "") + "".join(
                f'<tool_call>{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}</tool_call>'
                for c in m.tool_calls
            )
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text or ""})
    if tool_mode(body) is not None:
        assert body.tools is not None  # a tool mode needs tools
        described = tools.describe(body.tools)
        if messages[0]["role"] == "system":
            messages[0]["content"] += "\n\n" + described
        else:
            messages.insert(0, {"role": "system", "content": described})
    return messages


TEMPLATE_KWARGS, TEMPLATE_KWARGS_CHARS, TEMPLATE_KWARGS_DEPTH = 16, 4096, 8  # chat_template_kwargs' bounds
TEMPLATE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _depth(value, limit: int) -> int:
    """How deep lists and dicts nest in `value` (counted up to `limit` + 1 at most)."""
    if limit < 0 or not isinstance(value, (list, dict)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _template_kwargs(kwargs: dict | None) -> dict:
    """chat_template_kwargs, checked: a few variables for the template, none of which may be one of
    `apply_chat_template`'s own arguments (tokenize, chat_template, ...) or a variable the server sets."""
    if not kwargs:
        return {}
    import inspect

    from transformers import PreTrainedTokenizerBase

    reserved = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) | {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
    }
    if (
        len(kwargs) > TEMPLATE_KWARGS
        or _depth(kwargs, TEMPLATE_KWARGS_DEPTH) > TEMPLATE_KWARGS_DEPTH
        or len(json.dumps(kwargs)) > TEMPLATE_KWARGS_CHARS
    ):
        raise bad_request(
            f"chat_template_kwargs may hold at most {TEMPLATE_KWARGS} variables, {TEMPLATE_KWARGS_CHARS} "
            f"characters of JSON in all, nested at most {TEMPLATE_KWARGS_DEPTH} deep; send less",
            "chat_template_kwargs",
        )
    for name in kwargs:
        if not TEMPLATE_NAME.match(name) or name in reserved:
            raise bad_request(
                f"chat_template_kwargs: {name[:64]!r} is not a template variable a request may set (names "
                "are identifiers of at most 64 characters, not the template's own arguments such as "
                "tokenize or chat_template)",
                "chat_template_kwargs",
            )
    return kwargs


def _prompts_ids(gen: Generator, body, max_chars: int) -> list[list[int]]:
    """The token ids of each prompt of the body (a chat body has one)."""
    prompt = body.prompt if isinstance(body, CompletionRequest) else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return [_prompt_ids(gen, body, max_chars, one) for one in prompt]
    return [_prompt_ids(gen, body, max_chars, prompt)]


def _prompt_ids(gen: Generator, body, max_chars: int, prompt=None) -> list[int]:
    context = gen.runtime.info.max_positions
    if isinstance(body, ChatCompletionRequest):
        if len(body.messages) > MAX_MESSAGES:  # each costs template work and tokens, even when empty
            raise bad_request(
                f"messages holds {len(body.messages)} messages; at most {MAX_MESSAGES}",
                "messages",
                code="context_length_exceeded",
            )
        messages = _messages(gen, body)
        if (chars := sum(len(m["content"]) for m in messages)) > max_chars:
            raise _too_long("messages", chars, max_chars, context)
        try:
            text = gen.chat_text(
                messages,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                template_kwargs=_template_kwargs(body.chat_template_kwargs),
            )
        except APIError:
            raise
        except InvalidRequestError as exc:
            raise bad_request(str(exc), "messages") from exc
        except Exception as exc:  # a chat template may reject a conversation (e.g. roles out of order)
            raise bad_request(f"the model's chat template rejected the messages: {exc}", "messages") from exc
        if len(text) > max_chars:  # the template's own text counts too, and it is checked before tokenizing
            raise bad_request(
                f"the messages, with the chat template around each, have {len(text)} characters, more "
                f"than any {context}-token context can hold (at most {max_chars}); send fewer or "
                "shorter messages",
                "messages",
                code="context_length_exceeded",
            )
        return gen.chat_ids(text)
    if isinstance(prompt, list):
        return list(prompt)
    if len(prompt) > max_chars:
        raise _too_long("prompt", len(prompt), max_chars, context)
    return gen.encode(prompt, chat=False) if prompt else []
