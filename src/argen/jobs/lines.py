"""The files of a batch job: input lines parsed into Jobs, output lines in OpenAI's batch output
shape, and what an existing output file says is already done (resume).

Input: one JSON value a line, blank lines skipped. Either OpenAI's batch-file line
`{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}`,
or a plain prompt, `{"prompt": "..."}` (optionally with a "custom_id") or a bare JSON string, which
becomes a chat request (a completion with `chat=False`), greedy unless the command line's options
say otherwise. The command line's options fill the fields any body leaves out. A line without a
custom_id gets `line-N`, N its 1-based line number in the file.

Output: one line a request, in input order:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`; a request the
server would refuse has its status (400, 404, 422) and OpenAI error body in `response`, and
`error` = {"code", "message"}; a line that is not a request at all has `response` null.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from argen.errors import ArgenError
from argen.server.errors import APIError

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
OPENAI_KEYS = {"custom_id", "method", "url", "body"}


@dataclass
class Job:
    """One input line: a request body for an endpoint, or the error that line is."""

    index: int  # position among the file's requests (0-based), the output's order
    line: int  # 1-based line number in the input file
    custom_id: str
    endpoint: str = "chat"  # "chat" | "completions"
    body: dict | None = None
    error: APIError | None = None


def _line_error(message: str) -> APIError:
    return APIError(400, message, code="invalid_line")


def parse_line(text: str, line: int, index: int, fill: dict, chat: bool) -> Job:
    """One non-blank input line -> a Job (with an error instead of a body if it is not a request).
    `fill`: body fields given on the command line, set where a body leaves them out (a plain prompt
    is also greedy unless `fill` says otherwise)."""
    default_id = f"line-{line}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Job(index, line, default_id, error=_line_error(f"line {line} is not JSON ({exc})"))
    except RecursionError:
        return Job(index, line, default_id, error=_line_error(f"line {line} nests JSON too deeply to read"))
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        return Job(
            index,
            line,
            default_id,
            error=_line_error(
                f'line {line} is a JSON {type(value).__name__}; give an object (OpenAI batch line or {{"prompt": ...}}) '
                "or a string"
            ),
        )
    custom_id = value.get("custom_id", default_id)
    if not isinstance(custom_id, str) or not custom_id:
        return Job(index, line, default_id, error=_line_error(f"line {line}: custom_id must be a non-empty string"))
    if "body" in value or "url" in value:
        return _openai_line(value, line, index, custom_id, fill)
    if set(value) - {"prompt", "custom_id"} or not isinstance(value.get("prompt"), str):
        return Job(
            index,
            line,
            custom_id,
            error=_line_error(
                f"line {line} is neither an OpenAI batch line (custom_id, method, url, body) nor a plain prompt "
                f'({{"prompt": "text"}} with an optional custom_id); it has keys {sorted(value)}'
            ),
        )
    prompt, plain_body = value["prompt"], {"temperature": 0.0, **fill}
    if chat:
        return Job(index, line, custom_id, "chat", {**plain_body, "messages": [{"role": "user", "content": prompt}]})
    return Job(index, line, custom_id, "completions", {**plain_body, "prompt": prompt})


def _openai_line(value: dict, line: int, index: int, custom_id: str, fill: dict) -> Job:
    problems = []
    if unknown := sorted(set(value) - OPENAI_KEYS):
        problems.append(f"unknown keys {unknown}")
    if value.get("method", "POST") != "POST":
        problems.append(f"method must be POST, not {value.get('method')!r}")
    if value.get("url") not in URLS:
        problems.append(f"url must be one of {sorted(URLS)}, not {value.get('url')!r}")
    if not isinstance(value.get("body"), dict):
        problems.append("body must be a JSON object (the request body)")
    if problems:
        return Job(index, line, custom_id, error=_line_error(f"line {line}: " + "; ".join(problems)))
    return Job(index, line, custom_id, URLS[value["url"]], {**fill, **value["body"]})


def read_jobs(path: Path, fill: dict, chat: bool = True) -> list[Job]:
    """Every request of the input file, in order; a custom_id seen before makes the later line an error
    (ids must be unique: resume skips by them)."""
    jobs: list[Job] = []
    first_seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")  # bad bytes: a 400 on their line
    except OSError as exc:
        raise ArgenError(f"cannot read the input file {str(path)!r}: {exc.strerror or exc}") from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        job = parse_line(raw, number, len(jobs), fill, chat)
        if job.custom_id in first_seen and job.error is None:
            job.body, job.error = (
                None,
                _line_error(
                    f"line {number}: custom_id {job.custom_id!r} was already used on line {first_seen[job.custom_id]}; "
                    "custom_ids must be unique"
                ),
            )
        first_seen.setdefault(job.custom_id, number)
        jobs.append(job)
    return jobs


def ok_line(job: Job, body: dict) -> dict:
    response = {"status_code": 200, "request_id": body.get("id", _new_id("req")), "body": body}
    return {"id": _new_id("batch_req"), "custom_id": job.custom_id, "response": response, "error": None}


def error_line(job: Job, error: APIError) -> dict:
    detail = {"code": error.code or error.type, "message": error.message}
    if error.code == "invalid_line":
        return {"id": _new_id("batch_req"), "custom_id": job.custom_id, "response": None, "error": detail}
    response = {"status_code": error.status, "request_id": _new_id("req"), "body": error.body()}
    return {"id": _new_id("batch_req"), "custom_id": job.custom_id, "response": response, "error": detail}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def encode_line(line: dict) -> str:
    """One output line, newline included (ASCII-escaped: text quoting a lone surrogate stays writable)."""
    return json.dumps(line, ensure_ascii=True, allow_nan=False) + "\n"


def done_ids(path: Path) -> set[str]:
    """custom_ids already in the output file. A last line without its newline (the writer died
    mid-line) is cut off the file, so that appending starts on a fresh line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    done = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            custom_id = json.loads(raw)["custom_id"]
        except (ValueError, KeyError, TypeError):
            raise ArgenError(
                f"line {number} of the output file {str(path)!r} is not an argen batch output line; "
                "give another OUT, or delete it to start over"
            ) from None
        done.add(custom_id)
    return done
