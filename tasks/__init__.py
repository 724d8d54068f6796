"""Pipeline stages: `tasks/<stage>.py` turns params into `quillan` library calls and files.

Every stage module exposes `run(params) -> metrics` and `INPUTS` (paths logged with their hashes).
"""

from __future__ import annotations

import importlib

STAGES = ("generate", "calibrate", "train", "grpo", "export", "benchmark")


class StageError(RuntimeError):
    """A stage stopped on bad input or a fault it detected; str() is the one-line reason."""


def run_stage(name: str, params) -> dict:
    """Run one stage by name. Expected failures (bad or missing input files, corrupt models,
    non-finite training) are re-raised as StageError with a message naming the file or step."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r} (one of: {', '.join(STAGES)})")
    from quillan.checkpoint import CheckpointError
    from tasks.tracking import TrackingUnreachable, check_tracking

    try:
        check_tracking()
    except TrackingUnreachable as e:
        raise StageError(str(e)) from e
    module = importlib.import_module(f"tasks.{name}")
    expected = (FileNotFoundError, CheckpointError, ValueError) + getattr(module, "FAILURES", ())
    try:
        return module.run(params)
    except expected as e:
        raise StageError(str(e)) from e
