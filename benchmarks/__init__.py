"""Benchmark scripts (run as ``python benchmarks/<name>.py``; never part of the test suite)."""
