"""`argen chat`: the REPL on the tiny model, fed lines through fake input and output streams."""

from __future__ import annotations

import io

import pytest

from argen.chat import ChatSession, repl
from argen.cli import main

GREEDY = {"max_new_tokens": 6}


def feed(session: ChatSession, lines: list[str], out=None) -> tuple[int, str, str]:
    it = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    out = out or io.StringIO()
    err = io.StringIO()
    code = repl(session, read, out, err)
    return code, out.getvalue(), err.getvalue()


def test_replies_stream_and_the_history_carries_over(tiny):
    session = ChatSession(tiny, options=GREEDY)
    code, out, _ = feed(session, ["hello", "and again"])
    assert code == 0
    first = tiny.generate([{"role": "user", "content": "hello"}], **GREEDY)
    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "and again"},
    ]
    second = tiny.generate(history, **GREEDY)  # the second turn sees the first one
    assert out == first.text + "\n" + second.text + "\n\n"  # the last newline: leaving on end of input
    assert session.turns == history + [{"role": "assistant", "content": second.text}]


def test_commands(tiny):
    session = ChatSession(tiny, options=GREEDY)
    code, out, err = feed(
        session,
        [
            "/system be brief",
            "hi",
            "/stats",
            "hi again",
            "/reset",
            '/strategy {"name": "beam", "num_beams": 2}',
            "/strategy nope",
            "/strategy",
            "/help",
            "/bogus",
            "/exit",
            "never read",
        ],
    )
    assert code == 0
    assert session.system == "be brief" and session.turns == [] and session.stats
    assert session.strategy == {"name": "beam", "num_beams": 2}
    assert err.count("tokens/s") == 0 and err.count(" tok/s, ") == 1 and "passes, finish:" in err
    assert "unknown strategy 'nope'" in err and "unknown command '/bogus'" in err and "/reset" in out
    assert "never read" not in out + err
    # the system prompt reaches the model
    want = tiny.generate([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], **GREEDY)
    assert out.startswith(want.text + "\n")


class InterruptingOut(io.StringIO):
    """Ctrl-C while the reply's third piece of text is being shown."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_a_reply_without_leaving(tiny):
    session = ChatSession(tiny, options={"max_new_tokens": 50})
    out = InterruptingOut()
    code, _, err = feed(session, ["hello", "/stats", "next"], out)
    assert code == 0 and "[stopped]" in err
    partial = session.turns[1]["content"]
    full = tiny.generate([{"role": "user", "content": "hello"}], max_new_tokens=50).text
    assert len(partial) < len(full) and full.startswith(partial)
    assert len(session.turns) == 4 and err.count("finish:") == 1  # the next turn ran to its end
    assert tiny.runtime.kv_pool().held == 0  # the stopped reply gave its KV blocks back


def test_the_oldest_turns_go_when_the_conversation_outgrows_the_context(tiny):
    session = ChatSession(tiny, options=GREEDY)
    long = "x" * 900  # about a token a character with the byte tokenizer; the context is 2048
    session.turns = [{"role": "user", "content": long}, {"role": "assistant", "content": long}]
    _, out, err = feed(session, ["y" * 900])
    assert "dropped the oldest turn" in err and session.turns[0]["content"] == "y" * 900 and out.strip()
    # one message longer than the context: an error, and the conversation goes on without it
    _, _, err = feed(session, ["z" * 3000])
    assert "error: the message is" in err and len(session.turns) == 2


def test_the_command_reads_stdin_until_eof(tiny, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", "--model", "tiny-random", "--max-new-tokens", "6"]) == 0
    want = tiny.generate([{"role": "user", "content": "hello"}], **GREEDY).text
    assert capsys.readouterr().out == want + "\n"


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--strategy", "nope"], ["--strategy-opt", "k=1"]])
def test_bad_options_are_refused_before_loading(capsys, monkeypatch, bad):
    monkeypatch.setattr("argen.api.load", lambda *a, **k: pytest.fail("loaded a model for a bad option"))
    assert main(["chat", "--model", "tiny-random", *bad]) == 2
    assert capsys.readouterr().err.startswith("argen: error:")
