"""Benchmark functions the CLI (``fedmm-secure bench ...``) calls; each returns a JSON-able dict.

The pytest-benchmark suites in ``bench/`` drive the same functions and print ratios against a
floor measured in the same run.
"""

from .masking import bench_masking

__all__ = ["bench_masking"]
