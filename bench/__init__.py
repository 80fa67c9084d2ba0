"""modelworkers benchmark suite: ``python -m bench.run [--quick] [--only SECTION,...]``.

Every compared figure is a ratio of two things measured in the same run (the machine is shared),
medians over repeats. See docs/benchmarks.md.
"""
