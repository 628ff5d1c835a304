"""Benchmarks: `pytest benchmarks/ --benchmark-json=benchmarks/results/<name>.json`, then
`python -m benchmarks.report benchmarks/results/<name>.json` for the table and plot.

Every row checks correctness before it is timed, and records its figures (throughput,
ratios taken in the same run, peak memory) in `extra_info`, which the report prints.
"""

import pytest


@pytest.fixture
def record(benchmark):
    """Set extra figures on the current benchmark row: record(images_per_s=...)."""

    def set_figures(**figures):
        benchmark.extra_info.update(figures)

    return set_figures
