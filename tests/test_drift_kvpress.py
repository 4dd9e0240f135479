"""The kvpress peer of `python -m benchmarks drift` (harness/kvpress_peer.py, harness/drift_kvpress.py): the budget
mapping, the row building and ordering with a fake peer (kvpress is not installed in argen's own
environment: it pins transformers<5.3), the install hint when kvpress is missing, and, where kvpress
is importable (`pip install 'argen[kvpress]'` in an environment of its own), kvpress itself on a tiny
HF Llama: at budget 1 every press equals HF greedy decoding with no press; where optimum-quanto is,
transformers' QuantizedCache (the `kv-quant-N` rows) and the bytes it holds."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from argen.errors import ArgenError
from benchmarks.harness import drift_kvpress, kvpress_peer
from benchmarks.harness.drift import NLLScorer, mean_nll
from benchmarks.harness.drift_bench import Case, parse_config
from benchmarks.harness.drift_kvpress import NO_PRESS, PeerConfig, arrange, parse_budgets, peer_records, press_budgets
from benchmarks.harness.kvpress_peer import METHODS, PeerRun, compression_ratio, parse_methods

HAS_KVPRESS = importlib.util.find_spec("kvpress") is not None
NO_KVPRESS = "kvpress is not installed here (it pins transformers<5.3): pip install 'argen[kvpress]' in its own venv"
HAS_QUANTO = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None
NO_QUANTO = "optimum-quanto is not installed here: pip install 'argen[kvpress]' in its own venv"


def test_budget_is_the_fraction_kept_and_compression_ratio_the_fraction_removed():
    assert [compression_ratio(b) for b in (1, 0.5, 0.35, 0.2, 0.1)] == [0.0, 0.5, 0.65, 0.8, 0.9]
    for bad in (0, -0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ArgenError, match="fraction of positions kept"):
            compression_ratio(bad)
    assert parse_budgets("0.5, 0.35,0.5") == [0.5, 0.35]
    for bad in ("", "half", "0.5,2"):
        with pytest.raises(ArgenError, match="kvpress"):
            parse_budgets(bad)


def test_method_names_and_default_budgets():
    assert [m.name for m in parse_methods("snapkv,streaming-llm,snapkv")] == ["snapkv", "streaming-llm"]
    with pytest.raises(ArgenError, match="streaming-llm, h2o"):
        parse_methods("streaming-llm,gear")
    with pytest.raises(ArgenError, match=r"unknown method 'kv-quant-3', 'quant'; .*kv-quant-8, kv-quant-4, kv-quant-2"):
        parse_methods("kv-quant-8, kv-quant-3,quant")
    with pytest.raises(ArgenError, match="no method"):
        parse_methods(" , ")
    assert METHODS["pyramidkv"].beside == "prefix-kv" and not METHODS["pyramidkv"].decoding
    assert METHODS["snapkv"].beside == "snapkv" and METHODS["merging"].beside == "kvmerger" and METHODS["h2o"].eager
    assert [(m.bits, m.beside, m.row) for m in parse_methods("kv-quant-8,kv-quant-4")] == [
        (8, "kv-quant", "kv-quant"),
        (4, "kv-quant", "kv-quant"),
    ]
    configs = [
        parse_config("ffn-skip:threshold=0.9"),
        parse_config('{"method": "kvmerger", "options": {"press": {"name": "kvmerger", "budget": 0.35}}}'),
        parse_config('{"method": "streaming-llm", "options": {"press": "streaming-llm"}}'),
        parse_config('{"method": "kvmerger", "options": {"press": {"name": "kvmerger", "budget": 0.35}}}'),
    ]
    assert press_budgets(configs) == [0.35, 0.5]  # a press named without a budget keeps argen's default 0.5
    assert press_budgets(configs[:1]) == [0.5, 0.35, 0.2, 0.1]
    quantizing = [
        parse_config('{"method": "kv-quant", "options": {"press": {"name": "kv-quant", "bits": 4}}}'),
        parse_config('{"method": "gear", "options": {"press": "gear"}}'),
    ]
    assert press_budgets(quantizing) == [0.5, 0.35, 0.2, 0.1]  # no budget of their own: not argen's default 0.5
    assert press_budgets(quantizing + configs[1:2]) == [0.35]


def test_quantized_methods_run_once_whatever_the_budgets():
    configs = drift_kvpress.peer_configs(parse_methods("snapkv,kv-quant-8,kv-quant-4"), [0.5, 0.2])
    assert [(c.label, c.row_method, c.setting, c.budget) for c in configs] == [
        ("kvpress snapkv 0.5", "kvpress snapkv", "0.5", 0.5),
        ("kvpress snapkv 0.2", "kvpress snapkv", "0.2", 0.2),
        ("kvpress kv-quant 8-bit", "kvpress kv-quant", "8-bit", None),
        ("kvpress kv-quant 4-bit", "kvpress kv-quant", "4-bit", None),
    ]
    info = drift_kvpress.settings(configs)
    assert info["budgets"] == [0.5, 0.2] and info["methods"]["kv-quant-4"]["beside"] == "kv-quant"
    assert info["quantized_cache"]["residual_length"] == kvpress_peer.RESIDUAL
    assert "quantized_cache" not in drift_kvpress.settings(configs[:2])


def test_missing_quanto_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(ArgenError, match=r"optimum-quanto .*pip install 'argen\[kvpress\]'"):
        kvpress_peer.import_quanto()


def test_missing_kvpress_says_how_to_install(monkeypatch, tmp_path):
    from benchmarks.__main__ import main

    monkeypatch.setitem(sys.modules, "kvpress", None)  # import kvpress raises ImportError
    with pytest.raises(ArgenError, match=r"pip install 'argen\[kvpress\]'.*transformers<5.3"):
        kvpress_peer.import_kvpress()
    code = main(
        ["drift", "--model", "tiny-random", "--kvpress", "streaming-llm", "--out", str(tmp_path), "--allow-dirty"]
    )
    assert code == 2 and not (tmp_path / "report.md").exists()


class FakePeer:
    """Answers like KVPressPeer: the reference is argen's exact output with its last token changed (so
    HF no-press differs from argen exact), and a press at budget b keeps round(b * n) of its tokens."""

    def __init__(self, exact: list[int]) -> None:
        self.exact, self.calls = exact, []

    def reference(self, prompt, max_new_tokens, ignore_eos):
        return PeerRun(self.exact[:-1] + [self.exact[-1] + 1], 1.0, 0.5, 1000, 2000, "none")

    def run(self, prompt, method, budget, max_new_tokens, ignore_eos):
        self.calls.append((method.name, budget))
        kept = round(budget * len(self.exact))
        return PeerRun(self.exact[:kept] + [0] * (len(self.exact) - kept), 2.0, 1.0, int(1000 * budget), 1500, "fake")


def test_peer_rows_compare_with_argen_exact_and_with_hf_under_the_same_scorer(tiny):
    prompt = tiny.encode("the cat sat on the mat")
    exact = tiny.generate(prompt, max_new_tokens=10, temperature=0, ignore_eos=True)
    fake = FakePeer(exact.token_ids)
    configs = [PeerConfig(METHODS["streaming-llm"], 1.0), PeerConfig(METHODS["snapkv"], 0.5)]
    case = Case("c1", "summarization", "x")
    with NLLScorer(tiny.runtime, prompt) as scorer:
        exact_nll = mean_nll(scorer.score(exact.token_ids))
        records = peer_records(fake, lambda ids: "", case, prompt, exact, scorer, exact_nll, configs, 10, True)
        assert fake.calls == [("streaming-llm", 1.0), ("snapkv", 0.5)]
        peer_records(fake, lambda ids: "", case, prompt, exact, scorer, exact_nll, configs, 10, True, reverse=True)
        assert fake.calls[2:] == [("snapkv", 0.5), ("streaming-llm", 1.0)]
        half_nll = mean_nll(scorer.score(exact.token_ids[:5] + [0] * 5))
    none, full, half = records
    assert none["label"] == NO_PRESS and none["hf_equals_exact"] is False and none["first_divergence"] == 9
    assert none["token_agreement_hf"] is None and none["tok_s"] == 10 / 0.5
    assert full["label"] == "kvpress streaming-llm 1" and full["method"] == "kvpress streaming-llm"
    assert (full["token_agreement"], full["nll"], full["nll_exact"]) == (1.0, exact_nll, exact_nll)
    assert (full["token_agreement_hf"], full["first_divergence_hf"]) == (0.9, 9)  # vs the fake HF reference
    assert half["label"] == "kvpress snapkv 0.5" and half["setting"] == "0.5"
    assert (half["first_divergence"], half["token_agreement"]) == (5, 0.5)
    assert half["nll"] == pytest.approx(half_nll) and half["nll"] > exact_nll
    assert (half["kv_bytes"], half["peak_kv_bytes"], half["extras"]["press"]) == (500, 1500, "fake")
    assert drift_kvpress.hf_agreement(records) == {"prompts": 1, "hf_equals_exact": 0}


def test_kvpress_rows_sit_beside_argen_rows_of_the_same_method():
    rows = [
        {"method": m, "category": c}
        for m in (
            "exact",
            "streaming-llm",
            "kvmerger",
            "kv-quant",
            NO_PRESS,
            "kvpress kv-quant",
            "kvpress snapkv",
            "kvpress merging",
            "kvpress streaming-llm",
        )
        for c in ("rag", "all")
    ]
    order = [(r["method"], r["category"]) for r in arrange(rows)]
    methods = list(dict.fromkeys(m for m, _ in order))
    assert methods == [
        "exact",
        NO_PRESS,
        "streaming-llm",
        "kvpress streaming-llm",
        "kvmerger",
        "kvpress merging",
        "kv-quant",
        "kvpress kv-quant",
        "kvpress snapkv",
    ]  # snapkv sits beside h2o, which did not run: at the end
    assert order[:2] == [("exact", "rag"), ("exact", "all")]


def test_drift_bench_with_a_fake_peer_writes_kvpress_rows(tiny, tmp_path, monkeypatch):
    """The whole bench path without kvpress: the CLI flags, the rows in the report, the machine line."""
    from benchmarks.__main__ import main

    class Peer(FakePeer):
        def __init__(self, hf_model, eos_ids):
            assert hf_model is not None and eos_ids

        def warm_up(self):
            pass

        def reference(self, prompt, max_new_tokens, ignore_eos):
            return PeerRun([5] * max_new_tokens, 1.0, 0.5, 1000, 2000, "none")

        def run(self, prompt, method, budget, max_new_tokens, ignore_eos):
            assert (budget is None) == method.quantized
            return PeerRun([5] * max_new_tokens, 1.0, 0.5, 500, 1500, "fake")

    monkeypatch.setattr(kvpress_peer, "KVPressPeer", Peer)
    monkeypatch.setattr(kvpress_peer, "import_kvpress", lambda: None)
    monkeypatch.setattr(kvpress_peer, "import_quanto", lambda: None)
    monkeypatch.setattr(kvpress_peer, "kvpress_version", lambda package="kvpress": "9.9.9")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps(
            {
                "question_id": 1,
                "category": "summarization",
                "turns": ["Summarize: Alice Smith met Bob Jones in Paris in 2019."],
            }
        )
        + "\n"
    )
    out = tmp_path / "out"
    press = (
        '{"method": "streaming-llm", "setting": "0.5", "options": {"press": {"name": "streaming-llm", "budget": 0.5}}}'
    )
    quant = '{"method": "kv-quant", "setting": "4-bit", "options": {"press": {"name": "kv-quant", "bits": 4}}}'
    code = main(
        [
            "drift",
            "--model",
            "tiny-random",
            "--questions",
            str(questions),
            "--limit",
            "1",
            "--categories",
            "summarization",
            "--long-lengths",
            "",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--config",
            press,
            "--config",
            quant,
            "--kvpress",
            "streaming-llm,h2o,kv-quant-8,kv-quant-4",
            "--out",
            str(out),
            "--allow-dirty",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    labels = list(dict.fromkeys(r["label"] for r in results["summary"]))
    assert labels == [
        "exact",
        NO_PRESS,
        "streaming-llm 0.5",
        "kvpress streaming-llm 0.5",
        "kv-quant 4-bit",
        "kvpress kv-quant 8-bit",
        "kvpress kv-quant 4-bit",
        "kvpress h2o 0.5",
    ]
    assert results["settings"]["kvpress"]["budgets"] == [0.5]  # the press configurations' budgets (kv-quant: none)
    assert results["settings"]["kvpress"]["methods"]["h2o"]["attention"] == "eager"
    assert results["settings"]["kvpress"]["quantized_cache"]["optimum_quanto"] == "9.9.9"
    assert "--kvpress streaming-llm,h2o,kv-quant-8,kv-quant-4" in results["command"]
    assert results["machine"]["kvpress"] == "9.9.9"
    report = (out / "report.md").read_text()
    assert "kvpress streaming-llm 0.5" in report and "`h2o`: ObservedAttentionPress" in report
    assert "| kvpress kv-quant 8-bit " in report and "`QuantizedCache` (optimum-quanto 9.9.9)" in report
    assert "`kv-quant-8`" not in report  # the quantized rows have their own note, not the press list's
    assert "kvpress 9.9.9" in report and "transformers" in report


# -- kvpress itself (only where it is installed) ------------------------------------------------------------
@pytest.mark.skipif(not HAS_KVPRESS, reason=NO_KVPRESS)
def test_kvpress_at_budget_one_equals_hf_greedy_and_below_it_holds_less():
    from argen.models.tiny import tiny_llama

    model = tiny_llama(0)
    peer = kvpress_peer.KVPressPeer(model, {258})
    prompt = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = peer.reference(prompt, 24, ignore_eos=True)
    with torch.inference_mode():  # the peer's loop is HF greedy decoding: generate() gives the same tokens
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert reference.token_ids == hf[0, len(prompt) :].tolist()
    assert reference.kv_bytes == reference.peak_kv_bytes == 4 * 2 * 2 * (120 + 23) * 16 * 4  # layers, k+v, heads, dim
    full = peer.run(prompt, METHODS["streaming-llm"], 1.0, 24, ignore_eos=True)
    assert full.token_ids == reference.token_ids and full.kv_bytes == reference.kv_bytes
    for method in (m for m in METHODS.values() if not m.quantized):  # a control: each press runs, and presses
        half = peer.run(prompt, method, 0.5, 24, ignore_eos=True)
        assert len(half.token_ids) == 24 and half.kv_bytes < 0.7 * reference.kv_bytes, method.name
        assert method.press_name in half.press


@pytest.mark.skipif(not HAS_QUANTO, reason=NO_QUANTO)
def test_quantized_cache_holds_packed_codes_scales_and_the_fp32_residual(monkeypatch):
    """transformers' QuantizedCache at 8, 4 and 2 bits on a tiny HF Llama (4 layers, 2 kv heads of 16
    dimensions: groups of 16 values), with a residual of 8 positions so that 24 tokens flush it twice:
    the bytes held are exactly the codes, scales (and shifts) of the quantized positions plus the fp32
    residual, every layer; each is below the fp32 cache, and the quantization changes the output."""
    from transformers.cache_utils import QuantoQuantizedLayer

    from argen.models.tiny import tiny_llama

    monkeypatch.setattr(kvpress_peer, "RESIDUAL", 8)
    model = tiny_llama(0)
    peer = kvpress_peer.KVPressPeer(model, {258})
    prompt = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = peer.reference(prompt, 24, ignore_eos=True)
    layers, heads, dim, positions = 4, 2, 16, 120 + 23  # the last token is never fed
    assert (
        kvpress_peer.quant_group(model.config) == dim and reference.kv_bytes == layers * 2 * heads * positions * dim * 4
    )
    fp, quantized = 7, positions - 7  # the prompt, then 16 tokens in two flushes of 8; 7 in the residual
    for bits, meta in ((8, 4), (4, 8), (2, 8)):  # fp32 scale (8-bit: symmetric), and shift for 4 and 2 bits
        run = peer.run(prompt, METHODS[f"kv-quant-{bits}"], None, 24, ignore_eos=True)
        codes = (
            heads * quantized * dim * bits // 8 + heads * quantized * meta
        )  # per tensor: packed codes, meta per group
        assert run.kv_bytes == layers * 2 * (codes + heads * fp * dim * 4), bits
        assert run.kv_bytes < reference.kv_bytes and len(run.token_ids) == 24
        assert run.press == f"QuantizedCache(quanto, {bits}-bit), no press"
        if bits == 2:  # a control: the decoding read the quantized cache
            assert run.token_ids != reference.token_ids
    cache = kvpress_peer.quantized_cache(model.config, 4)
    assert isinstance(cache.layers[0], QuantoQuantizedLayer) and cache.layers[0].residual_length == 8
    assert cache.layers[0].axis_key == cache.layers[0].axis_value == 0
    int8 = kvpress_peer.quantized_cache(model.config, 8).layers[0]
    x = torch.randn(1, heads, 5, dim)
    assert (int8._dequantize(int8._quantize(x, 0)) - x).abs().max() <= x.abs().max() / 127  # within a step
