"""Shared pieces of the benchmarks: median timing, machine facts, JSON output."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from quillan.machine import cpu_info

from tasks.common import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable[[], object], min_reps: int = 5, max_reps: int = 50, budget_s: float = 1.0) -> float:
    """Median wall time of `fn()` after one warm-up call: at least `min_reps` runs, more (up to
    `max_reps`) while the total stays under `budget_s`."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {**cpu_info(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>.json (atomic, key-sorted), with the machine it was measured on."""
    path = RESULTS / f"{name}.json"
    write_json(path, {"machine": machine(), **payload})
    return path
