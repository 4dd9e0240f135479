"""mkdocs hooks (mkdocs' own `hooks:` setting, no plugin): the committed benchmark reports become
pages of the site, listed on a generated page (`reports.md`, in the nav), and the pages link to them
as they do on GitHub.

The reports live in `benchmarks/` at the repository root, outside `docs/`. A page links to one by its
path from the page, `../benchmarks/NAME/report.md`, which is right when the markdown is read on
GitHub or in a checkout; here each report (with the charts it shows) is added to the site under
`benchmarks/`, and those links are pointed at it, so `mkdocs build --strict` fails on a link to a
report that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks"
TO_REPORTS = re.compile(r"\]\(\.\./benchmarks/")


def command(report: Path) -> str:
    """The command a report starts with (its first code block, or a line that is one code span), on
    one line."""
    text = report.read_text()
    found = re.search(r"```\w*\n(.*?)```", text, re.S) or re.search(r"^`([^`]+)`$", text, re.M)
    return " ".join(found.group(1).split()) if found else "(in the report)"


def on_files(files, config):
    for path in sorted(REPORTS.rglob("*")):
        if path.suffix in (".md", ".png") and path.is_file():
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path),
                                        inclusion=InclusionLevel.NOT_IN_NAV))  # fmt: skip
    rows = [f"| [{report.parent.relative_to(ROOT).as_posix()}/]({report.relative_to(ROOT).as_posix()}) | "
            f"`{command(report).replace('|', '&#124;')}` |" for report in sorted(REPORTS.rglob("report.md"))]  # fmt: skip
    files.append(File.generated(config, "reports.md", content="\n".join([
        "# Reports", "",
        "Every report committed under `benchmarks/`, with the command that wrote it (each report names the "
        "commit it describes; [benchmarks](benchmarks.md) says how they were run).", "",
        "| report | command |", "|---|---|", *rows, ""])))  # fmt: skip
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri.startswith("benchmarks/"):
        return markdown
    return TO_REPORTS.sub("](" + "../" * page.file.src_uri.count("/") + "benchmarks/", markdown)
