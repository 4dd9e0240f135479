"""`argen caad-store`: build strategy caad's grounding store from a JSONL file of reference texts
(recipes/caad_store.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from argen.cli.options import add_model_options, model_spec
from argen.errors import ArgenError
from argen.recipes.caad_store import VALUE_FORMS, build_store, read_texts


def add_caad_store(sub) -> None:
    p = sub.add_parser(
        "caad-store",
        help="build a grounding store for strategy caad from reference texts",
        description='Run the model over each text of a JSONL file ({"text": ...} a line) and store, for '
        "every position, the final hidden state (the context embedding) and a sparse next-token "
        "distribution; strategy caad retrieves the nearest contexts and blends their distributions into "
        "the model's. The store is tied to the model's weights (a store for others is refused).",
    )
    add_model_options(p)
    p.add_argument("--input", required=True, metavar="FILE", help='JSONL file, one {"text": ...} per line')
    p.add_argument("--out", required=True, metavar="STORE", help="the store file to write (safetensors)")
    p.add_argument(
        "--values",
        choices=VALUE_FORMS,
        default="logits",
        help="what each entry predicts: the model's own top-k next-token distribution (logits) or the token "
        "the text has next (tokens, kNN-LM) (default: %(default)s)",
    )
    p.add_argument(
        "--top-k", type=int, default=32, help="tokens kept per entry with --values logits (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(handler=caad_store_command)


def caad_store_command(args: argparse.Namespace) -> int:
    if args.threads < 0:
        raise ArgenError("--threads must be >= 0")
    source = Path(args.input)
    if not source.is_file():
        raise ArgenError(f"--input {args.input!r} does not exist")
    texts = read_texts(source)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = model_spec(args).load_text()
    started = time.perf_counter()
    store = build_store(
        gen.runtime,
        (gen.encode(t, chat=False) for t in texts),
        values=args.values,
        top_k=args.top_k,
        progress=args.progress,
    )
    path = store.save(Path(args.out))
    print(
        f"argen: CAAD store of {len(store)} entries from {len(texts)} texts written to {path} in "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    print(path)
    return 0
