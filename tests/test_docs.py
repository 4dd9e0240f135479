"""The README stays a README and its links land: it is at most 200 lines (issue 26), and every
relative link in it names a file or folder that exists (the docs site's own links are checked by
`mkdocs build --strict` in CI; README.md is outside the site, so nothing else would notice a page
renamed under it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """The targets of the markdown links in `text` that point into the repository (no URL, no anchor
    of the same page), without their anchors."""
    return [
        target.split("#")[0]
        for target in LINK.findall(text)
        if not re.match(r"[a-z]+:", target) and not target.startswith("#")
    ]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the detail into a page under docs/"


def test_every_relative_link_in_the_readme_exists():
    """Guards against a README link to a docs page that was renamed or never written
    (`docs/strategy.md` for `docs/strategies.md`)."""
    links = relative_links((ROOT / "README.md").read_text())
    assert len(links) >= 15, links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to paths that do not exist: {missing}"


def test_the_readme_python_example_runs(capsys):
    """The README's Python example, run as written on the tiny random model instead of the default
    one (the API it shows is the API there is). Guards against an example that no longer runs: a
    renamed keyword (`max_new_token=32`), a strategy option that is not one (`max_drafts`)."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert block.count("argen.load()") == 1 and len(block.strip().splitlines()) <= 10
    exec(compile(block.replace("argen.load()", 'argen.load("tiny-random")'), "README.md", "exec"), {})
    assert re.search(r" (stop|length) \d", capsys.readouterr().out), "the example prints text, finish reason, tokens/s"
