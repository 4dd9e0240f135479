"""The measuring loop: every question through every system, interleaved, in one process; then each
system's tokens compared with its reference's, and every divergence of an exact system checked for a
floating-point near-tie (the one rule in `argen.neartie`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from argen.bench.questions import Question
from argen.neartie import NEAR_TIE, divergence, first_difference, top2_at
from benchmarks.harness.systems import System

WARMUP_TOKENS = 8


@torch.inference_mode()
def mean_nll(model, prompt_ids: list[int], continuation: list[int]) -> float | None:
    """The HF (fp32 reference) model's mean negative log-likelihood of `continuation` after the prompt."""
    if not continuation:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(continuation)], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
    picked = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids) :, None])
    return float(-picked.mean())


def run_questions(
    questions: list[Question],
    encode: Callable[[str], list[int]],
    systems: list[System],
    max_new_tokens: int,
    tie_model,
    warmup: bool = True,
    progress: bool = True,
    log_path: Path | None = None,
) -> list[dict]:
    """Measure every question on every system. The order of the systems alternates per question
    (forward, then reversed), so a slow drift of the machine's speed favours no system; ratios are
    taken per question, between calls made seconds apart. Returns one record per question."""
    if warmup and questions:
        ids = encode(questions[0].prompt)
        for system in systems:
            system.generate(ids, min(WARMUP_TOKENS, max_new_tokens))
    bar = tqdm(total=len(questions) * len(systems), desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    records = []
    try:
        for qi, question in enumerate(questions):
            ids = encode(question.prompt)
            order = systems if qi % 2 == 0 else systems[::-1]
            outputs = {}
            for system in order:
                bar.set_postfix_str(f"{question.category} #{question.question_id} {system.name}", refresh=False)
                outputs[system.name] = system.generate(ids, max_new_tokens)
                bar.update()
            record = judge(question, ids, order, systems, outputs, tie_model)
            for name, row in record["systems"].items():
                d = row.get("divergence")
                if d and row["exact"] and not d["near_tie"]:
                    bar.write(loud_divergence(question, name, row, d))
            records.append(record)
            if log_path is not None:
                with log_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
    finally:
        bar.close()
    return records


def judge(question: Question, ids: list[int], order, systems, outputs: dict, tie_model) -> dict:
    rows = {}
    for system in systems:
        out = outputs[system.name]
        decode_seconds = None if out.prefill_seconds is None else out.seconds - out.prefill_seconds
        row = {
            "new_tokens": out.new_tokens,
            "seconds": out.seconds,
            "tokens_per_s": out.new_tokens / out.seconds if out.seconds > 0 else 0.0,
            "prefill_seconds": out.prefill_seconds,
            # Decode speed: tokens per second after the prompt is in (argen's first step and llama.cpp's
            # first sample are on either side of that line, by one token; see systems.Output).
            "decode_tokens_per_s": out.new_tokens / decode_seconds if decode_seconds else None,
            "prefill_tokens_per_s": len(ids) / out.prefill_seconds if out.prefill_seconds else None,
            "tokens_per_forward": out.tokens_per_forward,
            "finish_reason": out.finish_reason,
            "reference": system.reference,
            "exact": system.exact,
            "token_ids": out.token_ids,
        }
        if system.reference is not None:
            ref = outputs[system.reference].token_ids
            position = first_difference(out.token_ids, ref)
            row["identical"] = position is None
            # Agreement: the share of the longer output produced before the first difference.
            longest = max(len(out.token_ids), len(ref), 1)
            row["agreement"] = 1.0 if position is None else position / longest
            row["tokens_before_divergence"] = min(len(out.token_ids), len(ref)) if position is None else position
            row["divergence"] = None
            # How much worse the reference model finds this output than the reference system's.
            row["nll_gap"] = 0.0 if position is None else _nll_gap(tie_model, ids, out.token_ids, ref)
            if position is not None and system.exact:
                row["divergence"] = divergence(tie_model, ids, out.token_ids, ref, position)
            elif position is not None:
                row["divergence"] = {"position": position, "near_tie": None}
        rows[system.name] = row
    return {
        "question_id": question.question_id,
        "category": question.category,
        "prompt_tokens": len(ids),
        "order": [s.name for s in order],
        "systems": rows,
    }


def _nll_gap(model, ids: list[int], tokens: list[int], ref: list[int]) -> float | None:
    mine, theirs = mean_nll(model, ids, tokens), mean_nll(model, ids, ref)
    return None if mine is None or theirs is None else mine - theirs


def loud_divergence(question: Question, name: str, row: dict, d: dict) -> str:
    return (
        f"!!! REAL DIVERGENCE (a bug): {name} vs {row['reference']} on {question.category} "
        f"#{question.question_id} at new token {d['position']}: {d['token']} vs {d['reference_token']}; "
        f"HF top-2 there {d['top2']} with logit gap {d['gap']:.3g}: not a near-tie (that needs a gap <= {NEAR_TIE:g} "
        "and the two tokens to be HF's top two)"
    )


__all__ = ["NEAR_TIE", "divergence", "first_difference", "judge", "run_questions", "top2_at"]
