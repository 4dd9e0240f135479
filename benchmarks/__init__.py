"""argen's benchmark harness and its committed reports (each `benchmarks/NAME/report.md` opens with
the command that wrote it). Not part of the wheel: run it from a checkout of the repository.

    pip install -e '.[bench]'              # argen plus what only the benchmarks use
    python -m benchmarks --help            # compare | drift | serving
    python benchmarks/NAME/run.py --help   # the one-off measurements beside their reports

`harness/` holds the shared code: provenance (commit, dirty tree, machine), the Spec-Bench
comparison with Hugging Face generate() and llama.cpp, drift and the kvpress peer, the serving
cases, the control bench and the reports and charts. docs/benchmarks.md is the guide.
"""
