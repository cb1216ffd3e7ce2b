"""Benchmarks (`make bench-*`): commands that print JSON, not tests."""
