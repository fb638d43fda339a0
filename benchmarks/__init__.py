"""Benchmarks for revdial, run by hand: ``python -m benchmarks.<name>``."""
