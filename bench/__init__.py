"""Topiq's benchmark harness: `bench/run` (or `python -m bench`) runs every workload for Topiq
and for the queues users would pick instead, and writes BENCHMARKS.md."""
