"""Shared pieces of the benchmarks: median timing, machine facts, JSON output."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quillan.machine import cpu_info

from tasks.common import write_json

# QUILLAN_BENCH_RESULTS: another folder, for a second machine's numbers beside the committed ones
# (bench/results/avx2/ holds an AVX2-only machine's).
RESULTS = Path(os.environ.get("QUILLAN_BENCH_RESULTS") or Path(__file__).resolve().parent / "results").resolve()


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int = 30, budget_s: float = 4.0) -> dict[str, float]:
    """Median ms of each callable, timed in rounds that call every one once (after one warm-up
    call each), so a clock or load drift during the run shifts all of them alike. Stops after
    `rounds` rounds, or earlier (5 at least) once `budget_s` seconds have passed."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if r >= 4 and time.perf_counter() - start > budget_s:
            break
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {**cpu_info(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>.json (or $QUILLAN_BENCH_RESULTS/<name>.json; atomic, key-sorted), with the
    machine it was measured on."""
    path = RESULTS / f"{name}.json"
    write_json(path, {"machine": machine(), **payload})
    return path
