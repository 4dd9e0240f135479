"""Prompts for self-distillation, built from text that is already on this machine.

A draft head learns the target model's own trajectories (recipes/draft_head.py), so what it needs
is prompts of the kinds chat models get, answered by the target. No data set is downloaded: the
passages come from Python's standard library (module and function docstrings, function source),
the documentation of installed packages (`*.dist-info/METADATA`, `/usr/share/doc` READMEs) and
translated man pages (`/usr/share/man/{de,fr,es}`), and the tasks are the usual ones: summarize,
translate, answer, answer from a passage, continue, explain code, write code, write prose, and
arithmetic word problems. The Spec-Bench questions (the bench's test set) are never read.

Everything is deterministic for a seed and a machine: files are read in sorted order and chosen
with a seeded `random.Random`.
"""

from __future__ import annotations

import ast
import gzip
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

MAX_PASSAGE_CHARS = 1400  # about 350 tokens: a summarization prompt stays a short prefill
MIN_PASSAGE_CHARS = 200
MAN_LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish"}
# roff escapes that man pages use for letters (groff's names), and the rest of roff to strip
_ROFF_CHARS = {
    "(:a": "ä",
    "(:o": "ö",
    "(:u": "ü",
    "(:A": "Ä",
    "(:O": "Ö",
    "(:U": "Ü",
    "(ss": "ß",
    "('e": "é",
    "(`e": "è",
    "(^e": "ê",
    "('a": "á",
    "(`a": "à",
    "(^a": "â",
    "(,c": "ç",
    "('o": "ó",
    "('i": "í",
    "(~n": "ñ",
    "('u": "ú",
    "(^o": "ô",
    "(^i": "î",
    "(^u": "û",
    "(aq": "'",
    "(lq": '"',
    "(rq": '"',
    "(em": "—",
    "(en": "–",
    "(bu": "•",
    "(oq": "'",
    "(cq": "'",
    "(Fo": "«",
    "(Fc": "»",
}


@dataclass
class Corpus:
    prose: list[str] = field(default_factory=list)  # documentation paragraphs (English)
    functions: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # (qualified name, first docstring line, source)
    topics: list[str] = field(default_factory=list)  # one-line descriptions: a package's summary, a man page's NAME
    foreign: list[tuple[str, str]] = field(default_factory=list)  # (language, sentence) from translated man pages


def _paragraphs(text: str) -> list[str]:
    """Paragraphs of running text (not tables, code or lists of options), cut to MAX_PASSAGE_CHARS."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines or any(line.startswith(("-", "*", "|", ">", "#", "=", "..", "$", "```", "+")) for line in lines):
            continue  # lists, tables, headings, code: not running text
        para = " ".join(lines)
        letters = sum(ch.isalpha() or ch == " " for ch in para)
        if len(para) >= MIN_PASSAGE_CHARS // 2 and letters > 0.85 * len(para) and para.isascii():
            out.append(para[:MAX_PASSAGE_CHARS])
    return out


def _passages(paragraphs: list[str]) -> list[str]:
    """Consecutive paragraphs joined into passages of MIN..MAX_PASSAGE_CHARS characters."""
    out, current = [], ""
    for para in paragraphs:
        joined = f"{current}\n\n{para}" if current else para
        if len(joined) > MAX_PASSAGE_CHARS:
            if len(current) >= MIN_PASSAGE_CHARS:
                out.append(current)
            current = para[:MAX_PASSAGE_CHARS]
        else:
            current = joined
    if len(current) >= MIN_PASSAGE_CHARS:
        out.append(current)
    return out


def _stdlib(corpus: Corpus, limit_files: int) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip", "config-")
    files = sorted(
        p for p in root.rglob("*.py") if not any(part.startswith(skip) for part in p.relative_to(root).parts)
    )
    for path in files[:limit_files]:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        doc = ast.get_docstring(tree)
        if doc:
            corpus.prose += _passages(_paragraphs(doc))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            code = ast.get_source_segment(source, node)
            if doc and code and 80 <= len(code) <= 1200:
                first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
                if 20 <= len(first) <= 200 and first.isascii():
                    corpus.functions.append((f"{module}.{node.name}", first, code))


def _metadata(corpus: Corpus, site_packages: list[Path]) -> None:
    for root in site_packages:
        for path in sorted(root.glob("*.dist-info/METADATA")):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            head, _, body = text.partition("\n\n")
            summary = next((line[9:].strip() for line in head.splitlines() if line.startswith("Summary: ")), "")
            name = next((line[6:].strip() for line in head.splitlines() if line.startswith("Name: ")), "")
            if name and 15 <= len(summary) <= 200 and summary.isascii():
                corpus.topics.append(f"{name}, {summary[0].lower()}{summary[1:].rstrip('.')}")
            corpus.prose += _passages(_paragraphs(body))


def _read(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _docs(corpus: Corpus, root: Path, limit_files: int) -> None:
    if not root.is_dir():
        return
    names = re.compile(r"^README(\.(md|txt|rst))?(\.gz)?$", re.IGNORECASE)
    files = []
    for package in sorted(
        root.iterdir()
    ):  # a README or two per package: one package's release notes would crowd out the rest
        if package.is_dir():
            files += sorted(p for p in package.iterdir() if p.is_file() and names.match(p.name))[:2]
    for path in files[:limit_files]:
        try:
            corpus.prose += _passages(_paragraphs(_read(path)))
        except (OSError, EOFError, gzip.BadGzipFile):
            continue


def roff_text(text: str) -> list[str]:
    """The running text of a man page's roff source, one paragraph per item (macros, fonts and
    escapes removed; a rough reading that keeps the prose)."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            if line[1:3] in ("PP", "SH", "TP", "SS", "IP", "P ", "LP", "sp") or line.strip() in (".P", ".PP", ".LP"):
                paragraphs.append(" ".join(current))
                current = []
            continue
        for name, char in _ROFF_CHARS.items():
            line = line.replace("\\" + name, char)
        line = re.sub(r"\\f[BIRPC]|\\f\(\w\w|\\&|\\\*\(\w\w|\\[(\[]\w+\]?", "", line)
        current.append(line.replace("\\-", "-").replace("\\e", "\\").strip())
    paragraphs.append(" ".join(current))
    return [re.sub(r"\s+", " ", p).strip() for p in paragraphs if p.strip()]


def _man(corpus: Corpus, root: Path, limit_files: int) -> None:
    english = root / "man1"
    if english.is_dir():
        for path in sorted(english.glob("*.1*"))[:limit_files]:
            try:
                paras = roff_text(_read(path))
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            name = next((p for p in paras if " - " in p and len(p) < 160), None)
            if name and name.isascii():
                corpus.topics.append(name.replace(" - ", ", the command to ", 1))
            corpus.prose += _passages(
                [
                    p[:MAX_PASSAGE_CHARS]
                    for p in paras
                    if len(p) >= MIN_PASSAGE_CHARS // 2 and p.isascii() and not any(ch in p for ch in "\\<>{}|=")
                ]
            )
    for lang, language in MAN_LANGUAGES.items():
        directory = root / lang
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*.[1-8]*"))[:limit_files]:
            try:
                paras = roff_text(_read(path))
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            for para in paras:
                for sentence in re.split(r"(?<=[.!?])\s+", para):
                    words = sentence.split()
                    if 8 <= len(words) <= 40 and not any(ch in sentence for ch in "\\<>{}|=") and "  " not in sentence:
                        corpus.foreign.append((language, sentence))


def local_corpus(limit_files: int = 400) -> Corpus:
    """The text this machine has: at most `limit_files` files of each source, in sorted order."""
    corpus = Corpus()
    _stdlib(corpus, limit_files)
    paths = sysconfig.get_paths()
    _metadata(corpus, sorted({Path(paths["purelib"]), Path(paths["platlib"])}))
    _docs(corpus, Path("/usr/share/doc"), limit_files)
    _man(corpus, Path("/usr/share/man"), limit_files)
    # Duplicates (the same README in two packages) would weigh twice.
    corpus.prose = list(dict.fromkeys(corpus.prose))
    corpus.topics = list(dict.fromkeys(corpus.topics))
    corpus.foreign = list(dict.fromkeys(corpus.foreign))
    return corpus


# -- tasks -------------------------------------------------------------------------------------
QUESTIONS = [
    "What is the main point of this text?",
    "What problem does this solve, and for whom?",
    "Which steps does the text describe, in order?",
    "What would a beginner find confusing here, and why?",
    "List the key terms in the text and explain each in one sentence.",
]
WRITING = [
    "Write a short blog post about {}.",
    "Explain {} to a high-school student.",
    "Write an email to a colleague recommending {}.",
    "Give three pros and three cons of {}.",
    "Write a short story in which someone relies on {}.",
]
ITEMS = ["apples", "books", "tickets", "bottles", "chairs", "pencils", "boxes", "plants"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jia"]


def _math(rng: random.Random) -> str:
    a, b, c, d = rng.randint(3, 60), rng.randint(2, 25), rng.randint(2, 12), rng.randint(1, 9)
    name, item, other = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(NAMES)
    return rng.choice(
        [
            f"{name} has {a} {item}. {name} buys {b} more every week for {c} weeks, then gives {d} to {other}. How many {item} does {name} have now?",
            f"A shop sells {item} for ${b} each. {name} buys {a} of them and pays with ${a * b + rng.randint(1, 50)}. How much change does {name} get?",
            f"{name} reads {b} pages a day. The book has {a * c} pages. After {c} days, what fraction of the book is left?",
            f"A train travels {a * 10} km in {d + 1} hours, then {b * 10} km in {c} hours. What is its average speed for the whole trip?",
            f"{name} and {other} share {a * (d + 1)} {item} in the ratio {d}:1. How many does each get?",
        ]
    )


KINDS = ("summarize", "translate", "answer", "passage", "continue", "explain code", "write code", "write", "math")


def build_prompts(corpus: Corpus, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (kind, prompt) pairs, the kinds in turn (a kind whose source text is missing here is left out)."""
    rng = random.Random(seed)
    available = {
        "summarize": bool(corpus.prose),
        "passage": bool(corpus.prose),
        "continue": bool(corpus.prose),
        "translate": bool(corpus.foreign),
        "answer": bool(corpus.topics or corpus.functions),
        "explain code": bool(corpus.functions),
        "write code": bool(corpus.functions),
        "write": bool(corpus.topics),
        "math": True,
    }
    kinds = [k for k in KINDS if available[k]]
    prompts = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "summarize":
            text = rng.choice(corpus.prose)
            prompt = rng.choice(
                [
                    "Summarize: {}",
                    "Summarize the following text in a few sentences.\n\n{}",
                    "Write a short summary of this documentation:\n\n{}",
                ]
            ).format(text)
        elif kind == "passage":
            prompt = f"{rng.choice(corpus.prose)}\n\n{rng.choice(QUESTIONS)}"
        elif kind == "continue":
            text = rng.choice(corpus.prose)
            prompt = f"Continue the following text:\n\n{text[: max(MIN_PASSAGE_CHARS, len(text) // 2)]}"
        elif kind == "translate":
            language, sentence = rng.choice(corpus.foreign)
            prompt = f"Translate {language} to English: {sentence}"
        elif kind == "answer":
            if corpus.functions and (not corpus.topics or rng.random() < 0.5):
                name, _, _ = rng.choice(corpus.functions)
                prompt = f"What does the Python function {name} do?"
            else:
                prompt = f"What is {rng.choice(corpus.topics)}? Answer briefly."
        elif kind == "explain code":
            _, _, code = rng.choice(corpus.functions)
            prompt = f"Explain what this Python code does:\n\n```python\n{code}\n```"
        elif kind == "write code":
            _, doc, _ = rng.choice(corpus.functions)
            prompt = f"Write a Python function for this task: {doc}"
        elif kind == "write":
            prompt = rng.choice(WRITING).format(rng.choice(corpus.topics))
        else:
            prompt = _math(rng)
        prompts.append((kind, prompt))
    return prompts
