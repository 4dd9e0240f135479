"""Set-based prompting (McIlroy-Young et al., 2024): a prompt part whose members form an unordered set.

`SetPrompt(prefix, members, suffix)` is laid out so the model cannot see the members' order:
- the prefix sits at positions 0..P-1 (causal);
- every member starts at position P (a shared position range) and attends to the prefix and to
  itself only (never to another member);
- the suffix starts after the longest member (P + max length) and attends to everything before it,
  as do the generated tokens.
Permuting the members then permutes rows and columns of the attention computation and nothing else,
so the output is order-independent mathematically. Floating-point sums still run over keys in storage
order, so by default the members are also stored in a canonical order (sorted by their token ids),
which makes every permutation bitwise identical.

With the chat template, the whole set prompt is the user message: the template is rendered around a
placeholder and split there; the template head + prefix are tokenized together, each member on its
own, and the suffix + template tail together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from argen.errors import InvalidRequestError

_PLACEHOLDER = "\x00ARGEN_SET_PROMPT\x00"


@dataclass(frozen=True)
class SetPrompt:
    prefix: str = ""
    members: tuple[str, ...] = field(default_factory=tuple)
    suffix: str = ""

    def __post_init__(self) -> None:
        members = self.members
        if isinstance(members, str) or not isinstance(members, (list, tuple)):
            raise InvalidRequestError("set prompt members must be a list of strings")
        object.__setattr__(self, "members", tuple(members))
        if not members or not all(isinstance(m, str) and m for m in members):
            raise InvalidRequestError("a set prompt needs at least one member, each a non-empty string")
        if not isinstance(self.prefix, str) or not isinstance(self.suffix, str):
            raise InvalidRequestError("set prompt prefix and suffix must be strings")

    @classmethod
    def from_json(cls, data) -> SetPrompt:
        """From `{"set_prompt": {"prefix": ..., "members": [...], "suffix": ...}}` (or the inner object),
        given as a dict, as JSON text, or as the path of a JSON file."""
        if isinstance(data, (str, Path)) and not str(data).lstrip().startswith("{"):
            path = Path(data)
            if not path.is_file():
                raise InvalidRequestError(f"set prompt {str(data)!r} is neither JSON text nor an existing file")
            data = path.read_text(encoding="utf-8")
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"set prompt is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and "set_prompt" in data:
            data = data["set_prompt"]
        if not isinstance(data, dict):
            raise InvalidRequestError(
                'a set prompt is {"set_prompt": {"prefix": ..., "members": [...], "suffix": ...}}'
            )
        unknown = sorted(set(data) - {"prefix", "members", "suffix"})
        if unknown:
            raise InvalidRequestError(
                f"unknown set prompt field(s) {', '.join(unknown)}; valid: prefix, members, suffix"
            )
        return cls(data.get("prefix", ""), data.get("members", ()), data.get("suffix", ""))

    def to_json(self) -> dict:
        return {"set_prompt": {"prefix": self.prefix, "members": list(self.members), "suffix": self.suffix}}


def is_set_prompt(prompt) -> bool:
    return isinstance(prompt, SetPrompt) or (isinstance(prompt, dict) and "set_prompt" in prompt)


@dataclass
class PromptLayout:
    """Prompt token ids plus, for a set prompt, their positions and [T, T] attention mask."""

    ids: list[int]
    positions: list[int] | None = None
    mask: torch.Tensor | None = None


def _tokens(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _chat_parts(tokenizer) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; pass chat=False (--no-chat) for a set prompt")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True, tokenize=False
    )
    if text.count(_PLACEHOLDER) != 1:
        raise InvalidRequestError("cannot place a set prompt in this model's chat template; pass chat=False")
    head, tail = text.split(_PLACEHOLDER)
    return head, tail


def set_prompt_layout(tokenizer, prompt: SetPrompt, chat: bool = True, canonical: bool = True) -> PromptLayout:
    """Token ids, positions and attention mask for a set prompt (see the module docstring).
    `canonical=False` keeps the members in the given order (tests use it to check the mask alone)."""
    if chat:
        head, tail = _chat_parts(tokenizer)
        prefix = _tokens(tokenizer, head + prompt.prefix)
        suffix = _tokens(tokenizer, prompt.suffix + tail)
    else:
        prefix = _tokens(tokenizer, prompt.prefix, special=True)
        suffix = _tokens(tokenizer, prompt.suffix)
        if not suffix:
            # Generation starts from the last prompt token, which sees everything: it must not be a member.
            raise InvalidRequestError(
                "a set prompt without the chat template needs a non-empty suffix "
                "(e.g. a newline); generation continues after it"
            )
    members = [_tokens(tokenizer, m) for m in prompt.members]
    if canonical:
        members.sort()
    n_prefix, longest = len(prefix), max(len(m) for m in members)
    ids = prefix + [t for m in members for t in m] + suffix
    positions = list(range(n_prefix))
    for m in members:
        positions += range(n_prefix, n_prefix + len(m))
    positions += range(n_prefix + longest, n_prefix + longest + len(suffix))
    total = len(ids)
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:n_prefix, :n_prefix] = torch.ones(n_prefix, n_prefix, dtype=torch.bool).tril()
    start = n_prefix
    for m in members:
        end = start + len(m)
        mask[start:end, :n_prefix] = True
        mask[start:end, start:end] = torch.ones(len(m), len(m), dtype=torch.bool).tril()
        start = end
    for row in range(start, total):
        mask[row, : row + 1] = True
    return PromptLayout(ids, positions, mask)
