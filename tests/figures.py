"""Figures a markdown page quotes from committed reports, read back against those reports.

A page (README.md, every docs/*.md page) cites a report by its path, `benchmarks/NAME/...`; the
report is the nearest folder at or above that path with a `report.md` (its tables and text), plus
its `results.json`. In a section (heading to heading), every table and paragraph after a citation
quotes the reports cited so far in that section:

- **a table row**: its figures (every number in every cell but the first, the row's label) must all
  stand in one row of one cited report's tables, written the same way (a page may leave columns
  out, never change a figure). Where the row's label is also a row label in the report (`h2o 0.5`,
  a prompt length), the matching row must carry it;
- **a paragraph**: every measured figure (a decimal number, a fraction such as 30/30, a number
  before × or %) must be one of the cited reports' figures, in the report's digits or a report
  number rounded to the page's digits. A figure the page derives (a ratio of two report figures) is
  in no report: the sentence holding it is rebuilt from the report by a test
  (`tests/test_readme_figures.py`) and passed here as `derived`, which leaves out exactly that text;
- **a citation**: the path exists, and a report read against has its report.md.

`quotes` finds what a page quotes, `check` judges one quote, `check_page` both for a whole page.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# A report's path from the repository root (`benchmarks/NAME/`), or a docs page's link to it
# (`../benchmarks/NAME/report.md`, right on GitHub; docs/hooks.py points it at the site's copy).
CITATION = re.compile(r"(?<![\w/.])(?:\.\./)?benchmarks/[\w./-]*[\w/]")
HEADING = re.compile(r"^#{1,6} ")
# A number: optional sign, digits (with thousands commas), decimals, or a fraction a/b; not inside
# a word (Q4_1, r4, min_layers=24 stay words) and not a version (0.3.36).
NUMBER = re.compile(r"(?<![\w.])[+\-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\w/]|\.\d)")


def normalize(figure: str) -> str:
    """One spelling per figure: no thousands commas, no plus sign, a minus sign as '-'."""
    return figure.replace(",", "").replace("−", "-").lstrip("+")


def figures(text: str) -> list[str]:
    return [normalize(m.group()) for m in NUMBER.finditer(text)]


def measured(text: str) -> list[tuple[int, str]]:
    """The measurements in prose, with their offsets: decimals, fractions, numbers before × or %
    (plain integers are mostly counts and settings: 30 questions, 2 threads, 128 tokens)."""
    out = []
    for m in NUMBER.finditer(text):
        if "." in m.group() or "/" in m.group() or text[m.end() : m.end() + 1] in ("×", "%"):
            out.append((m.start(), normalize(m.group())))
    return out


def table_rows(lines: list[str]) -> list[list[list[str]]]:
    """Every markdown table in `lines`: its body rows as lists of cells."""
    tables, current = [], None
    for line in lines + [""]:
        if line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []  # the header
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells if c):
                current.append(cells)
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def label(cell: str) -> str:
    """A row label as both pages and reports write it: no backticks, no trailing parenthesis."""
    return re.sub(r"\s*\([^)]*\)\s*$", "", cell.replace("`", "")).strip()


@dataclass(eq=False)  # compared by identity: one object per report folder
class Report:
    """One committed report: report.md's table rows, row labels and figures; results.json's numbers."""

    folder: Path
    name: str = ""  # the folder as the page cites it, benchmarks/...
    rows: list[list[str]] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)
    figures: set[str] = field(default_factory=set)
    numbers: list[float] = field(default_factory=list)
    _rounded: dict[int, set[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path, root: Path) -> Report:
        text = (folder / "report.md").read_text()
        report = cls(folder, str(folder.relative_to(root)))
        for table in table_rows(text.splitlines()):
            report.rows += table
            report.labels |= {label(r[0]) for r in table if r}
        report.figures = set(figures(text))
        if (folder / "results.json").is_file():
            report.numbers = list(_numbers(json.loads((folder / "results.json").read_text())))
        report.numbers += [float(f) for f in report.figures if "/" not in f]
        return report

    def has(self, figure: str) -> bool:
        """The figure in the report's own digits, or a report number rounded to the figure's digits."""
        if figure in self.figures:
            return True
        if "/" in figure:
            return False
        digits = len(figure.split(".")[1]) if "." in figure else 0
        if digits not in self._rounded:
            self._rounded[digits] = {normalize(f"{x:.{digits}f}") for x in self.numbers}
        return normalize(f"{float(figure):.{digits}f}") in self._rounded[digits]

    def row_with(self, wanted: list[str], name: str) -> list[str] | None:
        """A table row holding every figure of `wanted` (and labelled `name` where the report has
        that label), or None."""
        for row in self.rows:
            if name in self.labels and label(row[0]) != name:
                continue
            have = [f for cell in row for f in figures(cell)]
            if all(have.count(f) >= wanted.count(f) for f in set(wanted)):
                return row
        return None


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


@dataclass
class Quote:
    """What a page quotes from reports: a table row (`cells`) or a paragraph (`text`)."""

    page: str
    line: int
    reports: list[Report]
    cells: list[str] | None = None
    text: str = ""

    @property
    def checked(self) -> list[str]:
        """The figures this quote is held to."""
        if self.cells is not None:
            return [f for cell in self.cells[1:] for f in figures(cell)]
        return [f for _, f in measured(self.text)]


def check(quote: Quote) -> list[str]:
    """The problems with one quote (empty: every figure it holds is its reports')."""
    sources = ", ".join(r.name for r in quote.reports)
    where = f"{quote.page}:{quote.line}"
    if quote.cells is not None:
        name = label(quote.cells[0])
        if not any(r.row_with(quote.checked, name) for r in quote.reports):
            return [f"{where}: the row {quote.cells[0]!r} ({' | '.join(quote.cells[1:])}) is in no table of {sources}"]
        return []
    return [
        f"{where}: {figure} is in none of the reports cited ({sources})"
        for figure in quote.checked
        if not any(r.has(figure) for r in quote.reports)
    ]


def report_folder(root: Path, cited: str) -> Path:
    """The report a citation points into: the nearest folder at or above the path with a report.md
    (the cited folder itself if none has one, so that the check can say what is missing)."""
    path = root / cited.rstrip("/.")
    folder = path if path.is_dir() else path.parent
    probe = folder
    while probe != root and probe.parent != probe:
        if (probe / "report.md").is_file():
            return probe
        probe = probe.parent
    return folder


def quotes(page: Path, root: Path, derived: list[str] = ()) -> tuple[list[Quote], list[str]]:
    """Every table row and paragraph of `page` that quotes reports (module docstring), and the
    problems with its citations. `derived`: sentences checked elsewhere, left out of paragraphs."""
    loaded: dict[Path, Report | None] = {}
    found, problems = [], []
    name = str(page.relative_to(root)) if page.is_relative_to(root) else page.name
    cited: list[Report] = []
    fence, paragraph, table = False, [], []

    def close_paragraph() -> None:
        if paragraph and cited:
            text = " ".join(" ".join(line for _, line in paragraph).split())
            for sentence in derived:
                text = text.replace(" ".join(sentence.split()), " ")
            found.append(Quote(name, paragraph[0][0], list(cited), text=CITATION.sub(" ", text)))
        paragraph.clear()

    def close_table() -> None:
        if table and cited:
            for (number, _), cells in zip(table[2:], table_rows([line for _, line in table])[0], strict=False):
                if [f for cell in cells[1:] for f in figures(cell)]:
                    found.append(Quote(name, number, list(cited), cells=cells))
        table.clear()

    for number, line in enumerate(page.read_text().splitlines() + [""], 1):
        if line.startswith("```"):
            fence = not fence
            continue
        for match in CITATION.finditer(line):
            path = match.group().removeprefix("../")
            if not (root / path).exists():
                problems.append(f"{name}:{number}: cites {path}, which does not exist")
            elif not fence and "--out" not in line[max(0, match.start() - 8) : match.start()]:
                folder = report_folder(root, path)
                if folder not in loaded:
                    if (folder / "report.md").is_file():
                        loaded[folder] = Report.load(folder, root)
                    else:
                        loaded[folder] = None
                        problems.append(f"{name}:{number}: cites {path}, whose folder has no report.md")
                if loaded[folder] is not None and loaded[folder] not in cited:
                    cited.append(loaded[folder])
        if fence:
            continue
        if HEADING.match(line):
            close_paragraph()
            close_table()
            cited = []
        elif line.lstrip().startswith("|"):
            close_paragraph()
            table.append((number, line))
        elif line.strip():
            close_table()
            paragraph.append((number, line))
        else:
            close_paragraph()
            close_table()
    return found, problems


def check_page(page: Path, root: Path, derived: list[str] = ()) -> tuple[list[str], list[Quote]]:
    """Every problem with what `page` quotes from the reports under `root`, and the quotes checked."""
    found, problems = quotes(page, root, derived)
    for quote in found:
        problems += check(quote)
    return problems, found
