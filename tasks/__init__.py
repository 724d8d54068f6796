"""Pipeline stages: `tasks/<stage>.py` turns params into `quillan` library calls and files.

Every stage module exposes `run(params) -> metrics` and `INPUTS` (paths logged with their hashes).
"""

from __future__ import annotations

import importlib

STAGES = ("generate", "calibrate", "train")


def run_stage(name: str, params) -> dict:
    """Run one stage by name; raises KeyError for an unknown stage."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r} (one of: {', '.join(STAGES)})")
    return importlib.import_module(f"tasks.{name}").run(params)
