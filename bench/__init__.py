"""The modelworkers benchmark: ``python -m bench.run`` (docs/benchmarks.md)."""
