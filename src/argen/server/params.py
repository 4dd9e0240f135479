"""An OpenAI request body -> an argen Request (prompt ids, SamplingParams, strategy), with every
check that can fail done here, before the request is queued: errors are 400s that say what to fix."""

from __future__ import annotations

from argen.api import Generator
from argen.engine import Request
from argen.errors import InvalidRequestError
from argen.sampling import SamplingParams
from argen.server.errors import APIError, bad_request
from argen.server.protocol import ChatCompletionRequest, CompletionRequest
from argen.strategies import make_strategy

DEFAULT_MAX_TOKENS = 256


def build_request(gen: Generator, model_id: str, body: CompletionRequest | ChatCompletionRequest,
                  max_tokens_limit: int) -> Request:  # fmt: skip
    if body.model != model_id:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {model_id!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")  # fmt: skip
    _check_unsupported(body)
    prompt_ids = _prompt_ids(gen, body)
    context = gen.runtime.info.max_positions
    where = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if not prompt_ids:
        raise bad_request(f"the {where} is empty once tokenized; give at least one token", where)
    if len(prompt_ids) >= context:
        raise bad_request(f"the {where} has {len(prompt_ids)} tokens but the model's context is {context} tokens; "
                          f"shorten it to at most {context - 1} tokens", where, code="context_length_exceeded")  # fmt: skip
    asked = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        asked = body.max_completion_tokens
    if asked is not None and asked > max_tokens_limit:
        raise bad_request(f"max_tokens is {asked} but this server allows at most {max_tokens_limit}; ask for fewer",
                          "max_tokens")  # fmt: skip
    room = context - len(prompt_ids)
    if asked is not None and asked > room:
        raise bad_request(f"the model's context is {context} tokens and the {where} uses {len(prompt_ids)}, so "
                          f"max_tokens can be at most {room}; you asked for {asked}", "max_tokens",
                          code="context_length_exceeded")  # fmt: skip
    try:
        params = SamplingParams(
            max_new_tokens=asked or min(DEFAULT_MAX_TOKENS, max_tokens_limit, room),
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, seed=body.seed, ignore_eos=body.ignore_eos,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        )  # fmt: skip
    except InvalidRequestError as exc:
        raise bad_request(str(exc)) from exc
    spec = body.strategy if isinstance(body.strategy, str) else {"name": body.strategy.name, **body.strategy.model_extra}
    try:
        strategy = make_strategy(spec)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), "strategy") from exc
    request = Request(prompt_ids, params, strategy)
    try:
        gen.engine.validate(request)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), where) from exc
    return request


def _check_unsupported(body) -> None:
    """OpenAI fields argen does not implement: accepted only at their neutral values."""
    checks = [
        (body.n == 1, "n", "n must be 1: this server returns one choice per request; send n requests instead"),
        (body.presence_penalty == 0, "presence_penalty",
         "presence_penalty is not supported (only 0); use repetition_penalty (an argen extension)"),
        (body.frequency_penalty == 0, "frequency_penalty",
         "frequency_penalty is not supported (only 0); use repetition_penalty (an argen extension)"),
        (not body.logit_bias, "logit_bias", "logit_bias is not supported; leave it out"),
    ]  # fmt: skip
    if isinstance(body, CompletionRequest):
        checks += [
            (not body.echo, "echo", "echo is not supported; leave it out (or false)"),
            (body.logprobs is None, "logprobs", "logprobs is not supported; leave it out"),
            (body.suffix is None, "suffix", "suffix is not supported; leave it out"),
            (body.best_of in (None, 1), "best_of", "best_of is not supported (only 1); leave it out"),
        ]
    else:
        checks += [
            (not body.logprobs, "logprobs", "logprobs is not supported; leave it out (or false)"),
            (body.top_logprobs is None, "top_logprobs", "top_logprobs is not supported; leave it out"),
        ]
    for ok, param, message in checks:
        if not ok:
            raise bad_request(message, param, code="unsupported_parameter")


def _prompt_ids(gen: Generator, body) -> list[int]:
    if isinstance(body, ChatCompletionRequest):
        messages = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        try:
            return gen.encode(messages)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), "messages") from exc
        except Exception as exc:  # a chat template may reject a conversation (e.g. roles out of order)
            raise bad_request(f"the model's chat template rejected the messages: {exc}", "messages") from exc
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"prompt holds {len(prompt)} prompts; send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return list(prompt)
    return gen.encode(prompt, chat=False) if prompt else []
