"""Who may talk to `argen serve` and for how long: the API key (401), allowed Host names, idle and
request timeouts, the connection cap, rate-limited logs, CORS, and the serve command's new options."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import openai
import pytest
from server_helpers import running_server

import argen
from argen.server.logs import RateLimit

MODEL = "tiny-random"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def gen():
    return argen.load(MODEL)


# -- API key -----------------------------------------------------------------------------------
def test_api_key_is_required_except_on_health(gen):
    with running_server(gen, api_key=KEY) as (url, _):
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        for headers, message in [
            ({}, "You didn't provide an API key"),
            ({"Authorization": "Bearer wrong"}, "Incorrect API key provided"),
            ({"Authorization": "Basic " + KEY}, "You didn't provide an API key"),
            ({"Authorization": "Bearer \u00e9".encode()}, "Incorrect API key"),
        ]:
            r = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert message in error["message"] and error["code"] == "invalid_api_key"
            assert error["type"] == "invalid_request_error"
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(f"{url}{path}").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/openapi.json").status_code == 200  # the API's shape is public
        auth = {"Authorization": "Bearer " + KEY}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=auth).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert "rejected_401" in httpx.get(f"{url}/metrics", headers=auth).text


def test_api_key_from_the_environment(monkeypatch):
    from argen.cli import build_parser

    monkeypatch.setenv("ARGEN_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("ARGEN_API_KEY")
    assert build_parser().parse_args(["serve"]).api_key is None


def test_allowed_hosts(gen):
    with running_server(gen, allowed_hosts=["127.0.0.1", "api.example.com"]) as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/health", headers={"Host": "api.example.com"}).status_code == 200
        assert httpx.get(f"{url}/health", headers={"Host": "evil.example.net"}).status_code == 400


# -- CORS (issue 24) ---------------------------------------------------------------------------
ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_cors_is_off_unless_origins_are_allowed(gen):
    with running_server(gen) as (url, _):
        r = httpx.options(f"{url}/v1/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in r.headers and r.status_code >= 400
        r = httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, headers={"Origin": ORIGIN}
        )
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_allowed_origins_answer_the_preflight_before_the_key(gen):
    """Bug: a browser's preflight (OPTIONS, which never carries the key) got 401, and there was no
    option for CORS. With --allowed-origins it is answered before the key check; the request itself
    still needs the key, and other origins get no CORS headers."""
    with running_server(gen, api_key="k3y", allowed_origins=[ORIGIN]) as (url, _):
        r = httpx.options(f"{url}/v1/completions", headers=PREFLIGHT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Origin": ORIGIN})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN  # the page can read why
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Origin": ORIGIN, "Authorization": "Bearer k3y"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = httpx.options(f"{url}/v1/completions", headers=PREFLIGHT | {"Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


# -- connections -------------------------------------------------------------------------------
def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_connection_cap_and_timeouts(gen):
    """More idle connections than the cap: a normal client is still served (the longest-idle
    connections make room), the server never holds more than the cap, and idle connections are
    closed after the keep-alive timeout; one that trickles its request (which resets the
    keep-alive timer) is closed after the request timeout."""
    cap = 8
    with running_server(gen, max_connections=cap, timeout_keep_alive=1.0, request_timeout=2.5) as (url, srv):
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(cap + 6)]
        trickler = None
        try:
            time.sleep(0.2)
            assert len(srv.server_state.connections) <= cap
            for _ in range(3):  # a new connection each time: each makes room
                r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
                assert r.status_code == 200
                assert len(srv.server_state.connections) <= cap
            # The trickler connects last, so it is the newest connection: the room-making above may
            # close any idle one, and must not have closed it (a CI run once saw that).
            trickler = socket.create_connection((host, int(port)))
            started = time.monotonic()
            closed = []

            def trickle() -> None:
                for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
                    try:
                        trickler.send(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.3)  # well inside the keep-alive timeout, every time

            thread = threading.Thread(target=trickle, daemon=True)
            thread.start()
            assert all(closed_by_server(s, 3.0) for s in idle), "an idle connection stayed open"
            assert time.monotonic() - started < 3.0
            assert closed_by_server(trickler, 5.0)
            closed.append(time.monotonic() - started)
            assert 2.0 <= closed[0] < 5.0, closed  # the request timeout, not the keep-alive one
        finally:
            for s in [*idle, trickler]:
                if s is not None:
                    s.close()


def test_when_every_connection_is_busy_a_new_one_gets_503(gen):
    """Two connections each in the middle of sending a request (busy, not idle) fill a cap of 2: a
    third gets 503 and is closed; once they are gone, the server serves again."""
    with running_server(gen, max_connections=2) as (url, srv):
        host, port = url.removeprefix("http://").split(":")
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        busy = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            for s in busy:
                s.sendall(head)
            time.sleep(0.3)
            r = httpx.get(f"{url}/health")
            assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
        finally:
            for s in busy:
                s.close()
        time.sleep(0.3)
        assert httpx.get(f"{url}/health").status_code == 200


# -- logs --------------------------------------------------------------------------------------
def test_repeated_log_lines_are_rate_limited():
    limiter = RateLimit(per_interval=3, interval=0.3)

    def record(i: int) -> logging.LogRecord:
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, f"socket.accept() out of system resource\nsocket: fd={i}", None, None
        )

    passed = [r for r in (record(i) for i in range(1000)) if limiter.filter(r)]
    assert len(passed) == 3
    time.sleep(0.35)
    later = record(1000)
    assert limiter.filter(later) and "[997 more like this" in later.getMessage()


# -- the serve command -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["serve", "--limit", "num_beams"], "--limit takes NAME=VALUE"),
        (["serve", "--limit", "num_beams=0"], "--limit takes NAME=VALUE"),
        (["serve", "--limit", "beams=4"], "unknown limit 'beams'; limits: num_beams"),
        (["serve", "--max-body-bytes", "10"], "--max-body-bytes must be >= 1024"),
        (["serve", "--request-timeout", "0"], "--request-timeout must be > 0"),
        (["serve", "--api-key", " "], "--api-key (or ARGEN_API_KEY) is empty"),
        (["serve", "--prefill-slowdown", "1"], "--prefill-slowdown must be more than 1"),
        (["serve", "--model", MODEL, "--draft-model", "nosource"], "--draft-model takes NAME=SOURCE"),
        (["serve", "--model", MODEL, "--guide-model", f"{MODEL}=tiny-random@1"], "the name 'tiny-random' is taken"),
    ],
)
def test_serve_options_are_checked(capsys, monkeypatch, argv, words):
    from argen.cli import main

    monkeypatch.setattr("argen.server.serve.serve", _must_not_serve)
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_companions_must_share_the_vocabulary(capsys, monkeypatch, tmp_path):
    from argen.cli import main
    from argen.models import tiny

    tiny.tiny_llama(2, vocab_size=330).save_pretrained(tmp_path / "other")
    tiny.byte_tokenizer().save_pretrained(tmp_path / "other")
    monkeypatch.setattr("argen.server.serve.serve", _must_not_serve)
    assert main(["serve", "--model", MODEL, "--draft-model", f"other={tmp_path / 'other'}"]) == 2
    assert "its vocabulary (330 tokens) differs from the served model's (320)" in capsys.readouterr().err


def _must_not_serve(*args, **kwargs):
    raise AssertionError("the serve command went on to serve despite a bad option")
