"""vLLM's tokenizer routes: /tokenize, /detokenize and /tokenizer_info (lm-evaluation-harness's
`tokenizer_backend=remote` reads the last and calls the first two).

A prompt is tokenized as /v1/completions tokenizes it and messages as /v1/chat/completions does
(params.py, with the same checks), so a client counting tokens here counts what generation feeds.
Inputs are bounded as a prompt is: text by the characters any context could hold, token ids by the
context. /tokenizer_info names the tokenizer's special tokens and chat template, never a path."""

from __future__ import annotations

from typing import cast

from argen.api import Generator
from argen.server import protocol as p
from argen.server.errors import APIError, bad_request
from argen.server.params import Policy, _check_text, _prompt_ids


def _check_model(model: str | None, policy: Policy) -> None:
    if model is not None and model != policy.model_id:
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {policy.model_id!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def tokenize(gen: Generator, body: p.TokenizeRequest, policy: Policy) -> p.TokenizeResponse:
    """The token ids of a prompt or a conversation (CPU work: the app runs it in a worker thread)."""
    _check_text(body)
    _check_model(body.model, policy)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give either prompt (text) or messages (a conversation), one of the two", "prompt")
    if body.messages is not None:
        if body.add_special_tokens:
            raise bad_request(
                "add_special_tokens is for a prompt; the chat template adds the special tokens of "
                "messages (leave it out or false)",
                "add_special_tokens",
            )
        chat = p.ChatCompletionRequest.model_construct(
            model=policy.model_id,
            messages=body.messages,
            tools=body.tools,
            chat_template_kwargs=body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
        )
        ids = _prompt_ids(gen, chat, policy.max_chars)
    else:  # as /v1/completions tokenizes a text prompt (special tokens added unless asked not to)
        assert body.prompt is not None  # exactly one of prompt and messages (checked above)
        context = gen.runtime.info.max_positions
        if len(body.prompt) > policy.max_chars:
            raise bad_request(
                f"the prompt has {len(body.prompt)} characters, more than any {context}-token context "
                f"can hold (at most {policy.max_chars}); shorten it",
                "prompt",
                code="context_length_exceeded",
            )
        ids = gen.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"]
    # A list of ids gives a list of token strings (transformers types the one-id case too).
    strs = cast(list[str], gen.tokenizer.convert_ids_to_tokens(ids)) if body.return_token_strs else None
    return p.TokenizeResponse(count=len(ids), max_model_len=gen.runtime.info.max_positions, tokens=ids, token_strs=strs)


def detokenize(gen: Generator, body: p.DetokenizeRequest, policy: Policy) -> p.DetokenizeResponse:
    """The text of token ids, special tokens included (as vLLM's and `tokenizer.decode`'s default)."""
    _check_model(body.model, policy)
    context, vocab = gen.runtime.info.max_positions, gen.runtime.info.vocab_size
    if len(body.tokens) > context:
        raise bad_request(
            f"tokens holds {len(body.tokens)} ids, more than the model's context ({context}); send at "
            "most that many at a time",
            "tokens",
            code="context_length_exceeded",
        )
    if bad := [t for t in body.tokens if t >= vocab]:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens")
    # A list of ids decodes to one string (transformers types decode for a batch too).
    return p.DetokenizeResponse(prompt=cast(str, gen.tokenizer.decode(body.tokens)))


def tokenizer_info(gen: Generator) -> dict:
    """What a remote client needs to tokenize as the server does: the tokenizer's class, its special
    tokens, its chat template and the context (vLLM's shape). Built from named attributes only: the
    tokenizer's own init arguments hold local paths (name_or_path), which a client never sees."""
    tok = gen.tokenizer
    info = {"tokenizer_class": type(tok).__name__, "model_max_length": gen.runtime.info.max_positions}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        info[name] = value if isinstance(value, str) else None
    extra = getattr(tok, "additional_special_tokens", None) or getattr(tok, "extra_special_tokens", None) or []
    info["additional_special_tokens"] = [str(t) for t in extra] if isinstance(extra, list) else []
    for name in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces"):
        if isinstance(value := tok.init_kwargs.get(name, getattr(tok, name, None)), bool):
            info[name] = value
    if isinstance(template := getattr(tok, "chat_template", None), str):
        info["chat_template"] = template
    return info
