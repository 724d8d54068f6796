"""Pipeline stages: `tasks/<stage>.py` turns params into `quillan` library calls and files.

Every stage module exposes `run(params) -> metrics`; its inputs are its `deps` in dvc.yaml.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading
from typing import Iterator

STAGES = ("generate", "calibrate", "train", "grpo", "export", "benchmark")


class StageError(RuntimeError):
    """A stage stopped on bad input or a fault it detected; str() is the one-line reason."""


class StageInterrupted(BaseException):
    """SIGTERM arrived while a stage ran. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it, while every `finally` still runs: temporary outputs are
    removed, the MLflow run is closed as failed, checkpoints already written are kept."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into StageInterrupted for the duration (main thread only; elsewhere a no-op).
    Without it Python dies on SIGTERM without running any cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise StageInterrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stage(name: str, params) -> dict:
    """Run one stage by name. Expected failures (bad or missing input files, corrupt models,
    non-finite training) are re-raised as StageError with a message naming the file or step;
    SIGTERM raises StageInterrupted (a re-run resumes from the stage's last checkpoint)."""
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
        with sigterm_raises():
            return module.run(params)
    except expected as e:
        raise StageError(str(e)) from e
