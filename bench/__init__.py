"""Benchmarks (not part of the installed package): ``pytest bench/ --benchmark-only``."""
