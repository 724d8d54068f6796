"""Shared pieces of the benchmarks: median timing, machine facts, JSON output."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from quillan.machine import cpu_info

from tasks.common import write_json

RESULTS = Path(__file__).resolve().parent / "results"


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
