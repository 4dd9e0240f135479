"""Every committed report's command still names a working entry point with options it takes: the
command lines at the top of each `benchmarks/**/report.md` are parsed by the harness tool they
name (`python -m benchmarks compare|drift|serving`), and a `python benchmarks/NAME/run.py` script
must exist and define every option its command gives. Nothing is measured."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from benchmarks.harness import compare, drift_bench, serving

REPO = Path(__file__).resolve().parents[1]
REPORTS = sorted((REPO / "benchmarks").rglob("report.md"))


def commands(report: Path) -> list[str]:
    """The report's command lines: its first code block, or a first line that is one code span."""
    text = report.read_text()
    block = re.search(r"```\w*\n(.*?)```", text, re.S)
    span = re.search(r"^`([^`]+)`$", text, re.M)
    if block and (not span or block.start() < span.start()):
        return [line for line in block.group(1).splitlines() if line.strip()]
    return [span.group(1)] if span else []


def parser_for(tool: str) -> argparse.ArgumentParser:
    if tool == "serving":
        parser = serving.make_parser()
    else:
        parser = argparse.ArgumentParser(prog=tool)
        (compare if tool == "compare" else drift_bench).add_arguments(parser)
    parser.exit_on_error = False
    parser.error = lambda message: pytest.fail(f"{tool}: {message}")  # type: ignore[method-assign]
    return parser


def check(command: str) -> None:
    words = shlex.split(command.split(">")[0])  # a script's report goes to a file: not an argument
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # an environment setting (ARGEN_KERNELS=avx2)
        words.pop(0)
    if words[:3] == ["python", "-m", "benchmarks"]:
        assert words[3] in ("compare", "drift", "serving"), command
        parser_for(words[3]).parse_args(words[4:])
    elif words[:1] == ["python"] and re.fullmatch(r"benchmarks/[\w-]+/run\.py", words[1]):
        script = (REPO / words[1]).read_text()
        shared = set()  # the options provenance.script_args adds
        if "script_args(" in script:
            shared = {"--allow-dirty"} | ({"--threads"} if re.search(r"script_args\([^)]*threads=", script) else set())
        for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert f'"{option}"' in script or option in shared, f"{words[1]} defines no {option}"
    else:
        pytest.fail(f"not an entry point of this repository: {command}")


@pytest.mark.parametrize("report", REPORTS, ids=[str(r.parent.relative_to(REPO)) for r in REPORTS])
def test_report_command_parses(report):
    lines = commands(report)
    assert lines, f"{report.relative_to(REPO)} opens with no command"
    for line in lines:
        check(line)


def test_a_command_from_before_the_move_is_caught():
    with pytest.raises(pytest.fail.Exception, match="not an entry point"):
        check("argen bench --limit 3 --out benchmarks/foundation")
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --no-such-option"):
        check("python -m benchmarks compare --no-such-option 3")
    with pytest.raises(AssertionError, match="defines no --no-such-option"):
        check("python benchmarks/kernel_peak/run.py --no-such-option 2")
