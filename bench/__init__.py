"""Benchmarks: `make bench` (python -m bench) runs every scenario and writes bench/results.json."""
