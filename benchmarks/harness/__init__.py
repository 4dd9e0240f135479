"""The benchmark harness's code, run as `python -m benchmarks TOOL` (see `benchmarks/__init__.py`)."""
