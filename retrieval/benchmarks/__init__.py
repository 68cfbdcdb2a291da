"""Benchmarks run by tools/benchmark.py; each module exposes run(argv) -> dict."""
