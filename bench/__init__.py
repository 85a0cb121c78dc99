"""Benchmarks of tfscache: run from the repository root, e.g. ``python -m bench.warm_overhead --quick``."""
