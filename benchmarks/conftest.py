"""Benchmarks: pytest-benchmark timings plus ratios against baselines measured in the same run.

Run: ``pytest benchmarks --benchmark-json=benchmarks/latest.json`` (see benchmarks/README.md).
Each benchmark stores its baseline timing and the ratio in ``extra_info`` and prints it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RESULTS: list[str] = []


def best_of(fn: Callable[[], object], repeat: int = 5, number: int = 1) -> float:
    """Best wall time of ``number`` calls, over ``repeat`` rounds (seconds per call)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def record(benchmark, name: str, ours: float, baseline: float, baseline_name: str) -> float:
    ratio = baseline / ours
    benchmark.extra_info.update({f"{baseline_name}_s": baseline, "ours_s": ours, f"speedup_vs_{baseline_name}": ratio})
    RESULTS.append(f"{name}: ours {ours * 1e3:.3f} ms, {baseline_name} {baseline * 1e3:.3f} ms, ratio {ratio:.1f}x")
    return ratio


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.section("ratios against same-run baselines")
        for line in RESULTS:
            terminalreporter.write_line(line)
