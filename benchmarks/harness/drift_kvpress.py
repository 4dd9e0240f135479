"""The kvpress rows of `python -m benchmarks drift --kvpress`: NVIDIA kvpress's presses of the same names at the
same budgets, on the Hugging Face model with argen's weights (`kvpress_peer.py`), measured like
argen's rows: against argen's exact output (agreement), under the same NLLScorer (the full argen
model), with the same answer recall.

Per prompt, the peer also decodes with no press (the `kvpress none` row: Hugging Face greedy
decoding): its own exact output, which each kvpress row is also compared with (results.json:
`token_agreement_hf`, `first_divergence_hf`), and which shows how often the two runtimes' exact
outputs agree (`hf_equals_exact`).

The KV-quantization methods (`kv-quant-8`, ...: transformers' QuantizedCache, no press) keep every
position, so they have no budget: one row each, `kvpress kv-quant 8-bit`, beside argen's
`kv-quant` rows, whatever the budgets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from argen.errors import ArgenError
from benchmarks.harness.drift import agreement, answer_recall, mean_nll
from benchmarks.harness.kvpress_peer import ROWS, KVPressPeer, PeerMethod, PeerRun, compression_ratio

PEER = "kvpress"
NO_PRESS = f"{PEER} none"  # the peer's own exact run (HF greedy, no press)
BUDGETS = (0.5, 0.35, 0.2, 0.1)  # when no argen press configuration names budgets
QUANTIZING = ("kv-quant", "gear")  # argen's presses that keep every position (no budget)


@dataclass(frozen=True)
class PeerConfig:
    method: PeerMethod
    budget: float | None  # None for a quantized method: every position is kept

    @property
    def row_method(self) -> str:
        return f"{PEER} {self.method.row}"

    @property
    def setting(self) -> str:
        return f"{self.method.bits}-bit" if self.method.quantized else f"{self.budget:g}"

    @property
    def label(self) -> str:
        return f"{self.row_method} {self.setting}"


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ArgenError(
            f"--kvpress-budgets takes fractions kept separated by commas (e.g. 0.5,0.2); got {text!r}"
        ) from exc
    if not budgets:
        raise ArgenError("--kvpress-budgets needs at least one budget, e.g. 0.5")
    for budget in budgets:
        compression_ratio(budget)  # (0, 1], or an error saying so
    return list(dict.fromkeys(budgets))


def press_budgets(configs) -> list[float]:
    """The budgets of argen's press configurations (a press named without one keeps argen's default
    0.5; a quantizing press has none), in order; the four standard budgets when no configuration
    has a budgeted press."""
    budgets = []
    for config in configs:
        press = config.options.get("press")
        if isinstance(press, dict) and press.get("name") not in QUANTIZING:
            budgets.append(float(press.get("budget", 0.5)))
        elif isinstance(press, str) and press.split(":")[0].strip() not in QUANTIZING:
            found = re.search(r"budget=([\d.]+)", press)
            budgets.append(float(found.group(1)) if found else 0.5)
    return list(dict.fromkeys(budgets)) or list(BUDGETS)


def peer_configs(methods: list[PeerMethod], budgets: list[float]) -> list[PeerConfig]:
    """Each press at each budget; each quantized method once (it has no budget)."""
    return [c for m in methods for c in ([PeerConfig(m, None)] if m.quantized else [PeerConfig(m, b) for b in budgets])]


def _record(
    case,
    prompt_len: int,
    method: str,
    setting: str,
    label: str,
    run: PeerRun,
    text: str,
    exact,
    scorer,
    exact_nll,
    reference: PeerRun | None,
) -> dict:
    same = agreement(exact.token_ids, run.token_ids)
    hf = agreement(reference.token_ids, run.token_ids) if reference is not None else None
    return {
        "case": case.case_id,
        "category": case.category,
        "prompt_tokens": prompt_len,
        "peer": PEER,
        "method": method,
        "setting": setting,
        "label": label,
        "new_tokens": len(run.token_ids),
        "tok_s": run.tok_s,
        "kv_bytes": run.kv_bytes,
        "peak_kv_bytes": run.peak_kv_bytes,
        "first_divergence": same.first_divergence,
        "token_agreement": same.token_agreement,
        "nll_exact": exact_nll,
        "nll": mean_nll(scorer.score(run.token_ids)),
        "answer_recall": answer_recall(exact.text, text, case.source) if case.source else None,
        "first_divergence_hf": hf and hf.first_divergence,
        "token_agreement_hf": hf and hf.token_agreement,
        "hf_equals_exact": run.token_ids == exact.token_ids if reference is None else None,
        "extras": {"press": run.press, "seconds": run.seconds, "prefill_seconds": run.prefill_seconds},
    }


def peer_records(
    peer: KVPressPeer,
    decode,
    case,
    prompt: list[int],
    exact,
    scorer,
    exact_nll,
    configs: list[PeerConfig],
    max_new_tokens: int,
    ignore_eos: bool,
    reverse: bool = False,
) -> list[dict]:
    """The `kvpress none` row and one row per kvpress configuration for one prompt (`exact`: argen's
    exact Result for it; `decode`: token ids -> text). `reverse` runs the configurations in the
    opposite order (the bench alternates per prompt against slow drift of the machine's load)."""
    reference = peer.reference(prompt, max_new_tokens, ignore_eos)
    records = [
        _record(
            case,
            len(prompt),
            NO_PRESS,
            "",
            NO_PRESS,
            reference,
            decode(reference.token_ids),
            exact,
            scorer,
            exact_nll,
            None,
        )
    ]
    runs = {}
    for i in (reversed if reverse else list)(range(len(configs))):
        runs[i] = peer.run(prompt, configs[i].method, configs[i].budget, max_new_tokens, ignore_eos)
    for i, config in enumerate(configs):
        records.append(
            _record(
                case,
                len(prompt),
                config.row_method,
                config.setting,
                config.label,
                runs[i],
                decode(runs[i].token_ids),
                exact,
                scorer,
                exact_nll,
                reference,
            )
        )
    return records


def beside(method: str) -> str | None:
    """The argen method a row's method sits beside (`kvpress none` beside `exact`); None for argen's own."""
    if method == NO_PRESS:
        return "exact"
    if method.startswith(f"{PEER} "):
        peer = ROWS.get(method.removeprefix(f"{PEER} "))
        return peer.beside if peer else None
    return None


def arrange(rows: list[dict]) -> list[dict]:
    """Rows in the table's order: each argen method's rows, then the kvpress rows beside it; kvpress
    rows whose method argen did not run, at the end. Order within each method is kept."""
    argen = list(dict.fromkeys(r["method"] for r in rows if beside(r["method"]) is None and not _is_peer(r["method"])))
    rank = {m: i for i, m in enumerate(argen)}

    def key(item):
        index, row = item
        home = beside(row["method"]) if _is_peer(row["method"]) else row["method"]
        return (rank.get(home, len(argen)), _is_peer(row["method"]), index)

    return [row for _, row in sorted(enumerate(rows), key=key)]


def _is_peer(method: str) -> bool:
    return method == NO_PRESS or method.startswith(f"{PEER} ")


def settings(configs: list[PeerConfig]) -> dict:
    """What the kvpress rows ran, for results.json and the report."""
    from benchmarks.harness.kvpress_peer import DECODE_INTERVAL, QUANT_GROUP, RESIDUAL, kvpress_version

    methods = list(dict.fromkeys(c.method for c in configs))
    info = {
        "version": kvpress_version(),
        "budgets": list(dict.fromkeys(c.budget for c in configs if c.budget is not None)),
        "decode_interval": DECODE_INTERVAL,
        "methods": {
            m.name: {
                "press": m.press_name,
                "pressed": _pressed(m),
                "beside": m.beside,
                "attention": "eager" if m.eager else "sdpa",
            }
            for m in methods
        },
    }
    if any(m.quantized for m in methods):
        info["quantized_cache"] = {
            "backend": "quanto",
            "optimum_quanto": kvpress_version("optimum-quanto"),
            "axis_key": 0,
            "axis_value": 0,
            "q_group_size": QUANT_GROUP,
            "residual_length": RESIDUAL,
        }
    return info


def _pressed(method: PeerMethod) -> str:
    if method.quantized:
        return "no press: every position kept, quantized"
    return "prefill and decoding" if method.decoding else "prefill only"


def hf_agreement(records: list[dict]) -> dict:
    """How often the peer's no-press output equals argen's exact output, over the prompts."""
    ref = [r for r in records if r["method"] == NO_PRESS]
    return {"prompts": len(ref), "hf_equals_exact": sum(bool(r["hf_equals_exact"]) for r in ref)}


def describe(info: dict, agree: dict, quant: str) -> list[str]:
    """The report's notes on the kvpress rows."""
    methods = "; ".join(
        f"`{name}`: {m['press']} ({m['pressed']}, {m['attention']} attention)"
        for name, m in info["methods"].items()
        if m["beside"] != "kv-quant"
    )
    pressed = (
        [
            f"- kvpress rows (`kvpress METHOD BUDGET`): NVIDIA kvpress {info['version']} on the Hugging Face model with the "
            f"same weights in fp32 (argen's rows: quant `{quant}`), compression_ratio = 1 − budget, greedy "
            "in kvpress's own loop (one pass over the whole prompt, pressed after each attention layer, then one token "
            f"per pass). {methods}. Pressed while decoding: the cache is pressed back to the budget of the positions seen "
            f"every {info['decode_interval']} steps (`CompressionRatioDecodingPress`); prefill only: it grows by one "
            "position per new token.",
        ]
        if methods
        else []
    )
    quantized = [_quantized_note(info)] if "quantized_cache" in info else []
    return [
        *pressed,
        f"- `kvpress none`: Hugging Face greedy decoding, no press: the same tokens as argen's `exact` on "
        f"{agree['hf_equals_exact']} of {agree['prompts']} prompts (the two runtimes' arithmetic differs). kvpress rows' "
        "agreement columns compare with argen's `exact`; against `kvpress none` they are in results.json "
        "(`token_agreement_hf`, `first_divergence_hf`). Their tok/s is the HF forward's: compare it with `kvpress none`, "
        "not with argen's rows.",
        "- kvpress KV MB: the bytes of the DynamicCache's key and value tensors, sampled after each attention layer "
        "(before the press's hook) and after each pass; peak includes a layer's whole prompt before it is pressed "
        "(argen prefills a pressed prompt in chunks of 128 positions).",
        *quantized,
    ]


def _quantized_note(info: dict) -> str:
    q = info["quantized_cache"]
    return (
        f"- `kvpress kv-quant N-bit` rows: no kvpress press; transformers' `QuantizedCache` (optimum-quanto "
        f"{q['optimum_quanto']}) in the same loop, every position kept (no budget), keys and values quantized "
        f"per token in groups of {q['q_group_size']} values (fewer where that does not divide the head dimension; argen's keys: per channel over 64 positions; quanto's "
        f"per-channel groups fail unless heads × positions is a multiple of 64), the newest positions (fewer than "
        f"{q['residual_length']}) in fp32, as argen's; 4 and 2 bits: asymmetric codes (quanto MaxOptimizer), 8 bits: "
        "quanto's symmetric qint8 (transformers' quanto layer takes 2 or 4 bits only); scales and shifts in fp32 "
        "(argen: fp16). Their KV MB: quanto's packed codes, scales and shifts plus the fp32 residual, every layer."
    )
