"""Where a recipe's cached artifact is: the default recipe's, the only one cached, or a path given.

`argen distill-draft` (a draft head file) and `argen distill-small` (a small model's directory) cache
what they make beside the model, keyed by its fingerprint and the recipe; a strategy's option then
names it `cached` or by path. One resolver for both, so their messages and rules stay alike; and
what both write of the run that made an artifact (`run_meta`) and how a remade one replaces the copy
loaded before (`forget_loaded`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from argen.errors import ArgenError
from argen.models.kernels import describe_cpu


@dataclass(frozen=True)
class Artifact:
    """What kind of cached thing is looked for, for the messages (`a draft head`, `draft head file`)."""

    what: str  # "draft head"
    plural: str  # "heads"
    given_as: str  # "draft head file": what a path given must name
    pass_hint: str  # "pass head=PATH": what to do when several are cached
    command: str  # "argen distill-draft"
    time_note: str  # "over half an hour on 2 cores"
    present: Callable[[Path], bool]  # whether a path holds a finished one
    exists: Callable[[Path], bool]  # whether a path given is of the right kind (Path.is_file, Path.is_dir)


def find_cached(source, default: Path, others: Callable[[], list[Path]], kind: Artifact, model_name: str) -> Path:
    """`source` None or "cached": `default` (the default recipe's) if made, else the only one of
    `others()` (every one cached for the model); a str or Path: that path, which must exist."""
    if source is None or source == "cached":
        if kind.present(default):
            return default
        found = others()
        if len(found) == 1:
            return found[0]
        listed = (
            f" ({len(found)} {kind.plural} with other recipes are cached: {', '.join(p.name for p in found)}; "
            f"{kind.pass_hint})"
            if found
            else ""
        )
        raise ArgenError(
            f"no {kind.what} is cached for {model_name}{listed}; run `{kind.command} --model "
            f"{model_name}` once ({kind.time_note}; it caches one beside the model)"
        )
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not kind.exists(path):
            raise ArgenError(f"{kind.given_as} {str(path)!r} does not exist; make one with `{kind.command}`")
        return path
    raise ArgenError(f"a {kind.what} is a path to a {kind.given_as} or 'cached'; got {type(source).__name__}")


def run_meta(started: float, cpu_started: float) -> dict:
    """The tail of a recipe's metadata: the run's wall-clock and CPU seconds since `started`
    (`time.perf_counter()`) and `cpu_started` (`time.process_time()`), and what they were measured
    on (the documented recipe times quote them)."""
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "threads": torch.get_num_threads(),
        "cpu": describe_cpu(),
        "torch": torch.__version__,
    }


def forget_loaded(by_path: dict, path: Path) -> None:
    """Drop the copy of `path` a runtime's memo holds (`by_path`, keyed by the resolved path as the
    loaders key it): a remade artifact replaces it, so the next load reads the new one."""
    by_path.pop(str(path.resolve()), None)
