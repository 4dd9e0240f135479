"""`argen chat`: a conversation in the terminal over the model's chat template, each reply streamed
as it is generated (Generator.stream), the history kept across turns.

Ctrl-C stops a reply (what was shown stays in the history) without leaving; Ctrl-D (end of input)
or /exit leaves. When the history outgrows the model's context, the oldest turns are dropped.
The command's options are argen.cli.chat's.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import TextIO

from argen.errors import InvalidRequestError

DEFAULT_MAX_NEW_TOKENS = 512
HELP = """commands:
  /reset              forget the conversation (the system prompt stays)
  /system TEXT        set the system prompt (/system alone removes it)
  /strategy SPEC      decoding strategy: a name (plain, prompt-lookup, beam, ...) or JSON,
                      e.g. {"name": "beam", "num_beams": 4}; /strategy alone shows it
  /stats              show or hide each reply's statistics (tokens, tokens/s, forward passes)
  /help               this text
  /exit               leave (Ctrl-D too); Ctrl-C stops a reply"""


class ChatSession:
    """A conversation: the messages so far, and how replies are generated."""

    def __init__(
        self,
        gen,
        *,
        system: str | None = None,
        strategy: str | dict = "plain",
        options: dict | None = None,
        stats: bool = False,
    ) -> None:
        self.gen, self.system, self.strategy, self.stats = gen, system, strategy, stats
        self.options = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **(options or {})}
        self.turns: list[dict] = []  # user and assistant messages, without the system prompt

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reply(self, text: str, out: TextIO, err: TextIO) -> None:
        """Stream the reply to `text` to `out`; it joins the history (as far as it got if interrupted)."""
        self.turns.append({"role": "user", "content": text})
        stream = self._stream(err)
        if stream is None:
            self.turns.pop()
            return
        shown: list[str] = []
        try:
            for event in stream:
                out.write(event.text)
                out.flush()
                shown.append(event.text)
        except KeyboardInterrupt:
            out.write("\n")
            err.write("[stopped]\n")
        except InvalidRequestError as exc:  # e.g. the message alone is longer than the context
            err.write(f"error: {exc}\n")
            self.turns.pop()
            return
        finally:
            stream.close()  # an interrupted reply leaves the decode loop now
        self.turns.append({"role": "assistant", "content": "".join(shown)})
        if stream.result is not None:
            out.write("\n")
            if self.stats:
                s = stream.result.stats
                err.write(
                    f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, {s.forward_passes} passes, "
                    f"finish: {stream.result.finish_reason}]\n"
                )

    def _stream(self, err: TextIO):
        """The reply's Stream, dropping the oldest turns while the conversation and a full reply
        would not fit the model's context."""
        context = self.gen.runtime.info.max_positions
        room = min(self.options["max_new_tokens"], context // 4)
        try:
            alone = ([{"role": "system", "content": self.system}] if self.system else []) + self.turns[-1:]
            if (n := len(self.gen.encode(alone))) >= context:  # no dropping makes it fit: keep the history
                raise InvalidRequestError(
                    f"the message is {n} tokens with the chat template, and the model's context "
                    f"is {context}; shorten it"
                )
            while len(self.turns) > 1 and len(self.gen.encode(self.messages())) + room > context:
                del self.turns[:2]  # the oldest user message and its reply
                err.write("[dropped the oldest turn: the conversation no longer fits the model's context]\n")
            stream = self.gen.stream(self.messages(), strategy=self.strategy, **self.options)
        except InvalidRequestError as exc:
            err.write(f"error: {exc}\n")
            return None
        return stream

    def command(self, line: str, out: TextIO, err: TextIO) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.turns.clear()
            err.write("[conversation cleared]\n")
        elif name == "/system":
            self.system = arg or None
            err.write(f"[system prompt {'set' if arg else 'removed'}]\n")
        elif name == "/strategy":
            if arg:
                self._set_strategy(arg, err)
            else:
                err.write(f"[strategy: {json.dumps(self.strategy)}]\n")
        elif name == "/stats":
            self.stats = not self.stats
            err.write(f"[stats {'on' if self.stats else 'off'}]\n")
        elif name == "/help":
            out.write(HELP + "\n")
        else:
            err.write(f"unknown command {name!r}; /help lists them\n")
        return True

    def _set_strategy(self, arg: str, err: TextIO) -> None:
        try:
            spec = json.loads(arg) if arg.startswith("{") else arg
            self.gen.prepare_strategy(spec)  # checked now, not at the next reply
        except (ValueError, TypeError) as exc:  # InvalidRequestError and JSONDecodeError are ValueErrors
            err.write(f'error: {exc}; /strategy takes a name or a JSON object with a "name"\n')
            return
        self.strategy = spec
        err.write(f"[strategy: {json.dumps(spec)}]\n")


def repl(session: ChatSession, read: Callable[[str], str], out: TextIO, err: TextIO, prompt: str = "> ") -> int:
    """Read lines with `read(prompt)` (EOFError ends) until /exit; reply to each."""
    while True:
        try:
            line = read(prompt)
        except EOFError:
            out.write("\n" if prompt else "")
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            out.write("\n")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line, out, err):
                return 0
            continue
        session.reply(line, out, err)


def reader(interactive: bool) -> Callable[[str], str]:
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        return input

    def read(_prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read
