"""Benchmarks: our paths against a re-implementation of the reference code, in the same run.

Run them from the repository root as modules, e.g. ``python -m benchmarks.inference --quick``.
"""
