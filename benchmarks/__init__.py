"""bench.py's benchmarks, one room each; every one writes its own section of BENCHMARKS.md."""
