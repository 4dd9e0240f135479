"""What makes a report reproducible from the repository: the commit it was measured at and whether
the working tree had uncommitted changes, the package versions and the machine; paths written
relative to the repository, never as absolute machine paths.

Every report writer (`python -m benchmarks compare|drift|serving`, `benchmarks/*/run.py`) calls
`git_state()` before measuring, refuses a dirty tree unless told (`--allow-dirty`), and records
`provenance()`; the scripts get all three from `script_args()`. Report outputs (anything under `benchmarks/` but its `.py` scripts) do not make a
tree dirty: a run may rewrite the report it regenerates.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from argen.errors import ArgenError

_HARNESS_DIR = Path(__file__).resolve().parent


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def repo_root() -> Path | None:
    """The git checkout this harness runs from (its `benchmarks/harness/`); None outside one."""
    top = _git("rev-parse", "--show-toplevel", cwd=_HARNESS_DIR)
    if not top:
        return None
    root = Path(top.strip())
    # A copy of the harness inside some other checkout is not that checkout.
    return root if (root / "benchmarks" / "harness").resolve() == _HARNESS_DIR else None


def _is_report_output(path: str) -> bool:
    return path.startswith("benchmarks/") and not path.endswith(".py")


def git_state(root: Path | None = None) -> dict:
    """{"git_commit": short hash, "git_dirty": bool, "dirty_files": [...]}; None values outside a checkout."""
    root = root or repo_root()
    commit = _git("rev-parse", "--short", "HEAD", cwd=root) if root else None
    status = _git("status", "--porcelain", "--untracked-files=all", cwd=root) if root else None
    if commit is None or status is None:
        return {"git_commit": None, "git_dirty": None, "dirty_files": []}
    changed = [line[3:].split(" -> ")[-1].strip('"') for line in status.splitlines() if line.strip()]
    dirty = sorted(p for p in changed if not _is_report_output(p))
    return {"git_commit": commit.strip(), "git_dirty": bool(dirty), "dirty_files": dirty[:20]}


def provenance(state: dict | None = None) -> dict:
    """The commit (with its dirty flag), package versions and machine, for a report's header."""
    import torch
    import transformers

    import argen
    from argen.models.kernels import cpu_name

    return (state or git_state()) | {
        "argen": argen.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_info(state: dict | None = None) -> dict:
    """`provenance()` and the CPU features and kernels argen's fast path runs on."""
    from argen.models.kernels import describe_cpu

    return provenance(state) | {"cpu": describe_cpu()}


def script_args(
    doc: str | None, *, threads: int | None = None, argv: list[str] | None = None, root: Path | None = None, add=None
) -> tuple[argparse.Namespace, dict]:
    """The preamble every `benchmarks/*/run.py` shares: a parser described by the first line of the
    script's docstring with `--allow-dirty` (and `--threads N` when `threads` is its default; torch
    is set to it), `add(parser)` for the script's own options; then the git state, refused when
    dirty unless `--allow-dirty`. Returns (args, state); `provenance(state)` is the report header."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n\n")[0])
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch threads (default: %(default)s)")
    parser.add_argument(
        "--allow-dirty", action="store_true", help="run from a tree with uncommitted changes (recorded)"
    )
    if add is not None:
        add(parser)
    args = parser.parse_args(argv)
    state = git_state(root)
    require_clean(state, args.allow_dirty)
    if threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return args, state


def require_clean(state: dict, allow_dirty: bool) -> None:
    """Refuse to measure for a report that could not be reproduced from its commit."""
    if state["git_dirty"] and not allow_dirty:
        files = ", ".join(state["dirty_files"][:5]) + (" ..." if len(state["dirty_files"]) > 5 else "")
        raise ArgenError(
            f"the working tree has uncommitted changes ({files}): a report from it could not be "
            "reproduced from its commit; commit them, or pass --allow-dirty to record them as dirty"
        )


def describe(state: dict) -> str:
    """One line for a report: which commit, and whether the tree was clean."""
    if state.get("git_commit") is None:
        return "Provenance: not measured from a git checkout (argen " + str(state.get("argen", "?")) + ")."
    if state.get("git_dirty") is None:
        return f"Provenance: commit {state['git_commit']}, working tree state not recorded."
    if state["git_dirty"]:
        return (
            f"Provenance: commit {state['git_commit']} **with uncommitted changes** "
            f"({', '.join(state['dirty_files'])}): not reproducible from the commit alone."
        )
    return f"Provenance: commit {state['git_commit']}, clean working tree."


def portable_path(path: str | os.PathLike) -> str:
    """`path` relative to the repository root (`../shared/...` for the Spec-Bench questions next to
    it; the current directory stands in outside a checkout). A path outside the repository's parent
    directory says nothing on another machine: only its name is kept, as `<outside>/NAME`."""
    text = str(path)
    if not os.path.isabs(text):
        return text
    relative = os.path.relpath(text, repo_root() or Path.cwd())
    return f"<outside>/{Path(text).name}" if relative.startswith(os.path.join("..", "..")) else relative


def portable_argv(argv: list[str]) -> list[str]:
    """argv with the interpreter or script reduced to its name and absolute paths made portable."""
    if not argv:
        return []
    return [os.path.basename(argv[0]), *(portable_path(a) if os.path.isabs(a) else a for a in argv[1:])]


def env_prefix() -> str:
    """What a report's command line must start with to rerun it: `ARGEN_KERNELS=...` where a kernel
    build other than this CPU's best was asked for, else nothing."""
    kernels = os.environ.get("ARGEN_KERNELS")
    return f"ARGEN_KERNELS={shlex.quote(kernels)} " if kernels else ""


@contextlib.contextmanager
def report_to(out: str | None) -> Iterator[None]:
    """A script's printed report goes to the file `out` (its folder made), or to stdout if None."""
    if out is None:
        yield
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        yield


def portable_command(parts: list[str]) -> str:
    return shlex.join(portable_path(p) if os.path.isabs(p) else p for p in parts)


def rerun_command(script: str) -> str:
    """The command line that reruns this script as it was run (`script`: its path from the repository
    root), with the `ARGEN_KERNELS` it ran under: the first line of its report."""
    return env_prefix() + portable_command(["python", script, *sys.argv[1:]])
