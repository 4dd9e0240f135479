#!/bin/sh
# Issue 25's pieces together, as one command from the repository root (a clean tree):
#
#     sh benchmarks/speculative-head/run.sh [BENCH_DIR [CEILING_DIR]]
#
# (defaults: benchmarks/speculative-head and benchmarks/draft_ceiling/avx2-two-threads, the AMD EPYC Zen 3's
# reports; another machine writes its own, e.g. `sh benchmarks/speculative-head/run.sh
# benchmarks/speculative-head/avx512 benchmarks/draft_ceiling/avx512-two-threads`)
#
# 1. the draft head for the default model (`argen distill-draft`, the default recipe; returns at
#    once when it is cached: ~/.cache/argen/draft-heads/);
# 2. Spec-Bench on the fast path (the harness: pip install -e ".[bench]"), 30 questions x 128 tokens, every
#    exact strategy beside fast plain and llama.cpp on the same GGUF (pip install llama-cpp-python),
#    outputs judged against plain (writes report.md, results.json, chart.png in BENCH_DIR);
# 3. the draft ceiling re-run with the head's rows and these measured figures, its policy and prefill
#    view at two threads (CEILING_DIR/report.md).
set -e
bench=${1:-benchmarks/speculative-head}
ceiling=${2:-benchmarks/draft_ceiling/avx2-two-threads}
argen distill-draft --model default --threads 2
python -m benchmarks compare --model default --limit 5 --group-mt-bench --max-new-tokens 128 \
    --strategies plain,prompt-lookup,ngram,draft-head --dtypes float32 --hf-prompt-lookup 0 \
    --systems llama-cpp --threads 2 --reference plain --warmup --out "$bench"
python benchmarks/draft_ceiling/run.py --view-threads 2 --out "$ceiling" --measured "$bench"
