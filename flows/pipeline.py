"""The Quillan pipeline as one Prefect flow that drives DVC's stages in dvc.yaml order.

The flow does not reimplement the DAG: each Prefect task runs `dvc repro --single-item
<stage>`, so `quillan run`, a scheduled deployment and `dvc repro` share one cache and one
dvc.lock, and an unchanged stage is skipped by DVC in all three. Gates are DVC stages too; a
failing gate fails its task and the flow run with the gate's report as the message, and
nothing after it runs (so nothing is registered).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import ROOT
from tasks.params import load_params, write_params
from tasks.tracking import PARENT_ENV, TrackingUnreachable, check_tracking, pipeline_run, stage_run_link

FLOW_NAME = "quillan-pipeline"
# Failures worth a retry: another `dvc repro` holds the repo lock or (while its stage command
# runs) the read/write lock on the stage's files, or another process holds the sqlite MLflow
# store. Everything else (a stage's own error, a failing gate) is deterministic and would fail
# again the same way.
DVC_LOCKED = ("Unable to acquire lock", "is busy, it is being blocked by")
TRANSIENT = (*DVC_LOCKED, "database is locked")
LOCK_RETRIES, LOCK_DELAY_ENV = 2, "QUILLAN_LOCK_RETRY_DELAY_S"


def lock_retry_delay_s() -> float:
    """Seconds between retries of a stage that found the DVC or MLflow lock held (default 20)."""
    raw = os.environ.get(LOCK_DELAY_ENV, "20")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise PipelineFailed(f"{LOCK_DELAY_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


class PipelineFailed(RuntimeError):
    """A stage or gate failed; the message carries its output tail (the gate report)."""


def stage_order(dvc_file: Path = ROOT / "dvc.yaml") -> list[str]:
    """DVC stage names in the order dvc.yaml lists them (written in dependency order)."""
    return list((yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}))


def _env(parent_run_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env[PARENT_ENV] = parent_run_id
    # dvc.yaml calls `quillan ...`: make this interpreter's scripts first on PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _is_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only a failure caused by a lock another process held."""
    try:
        state.result()
    except PipelineFailed as e:
        return any(marker in str(e) for marker in TRANSIENT)
    except Exception:
        return False
    return False


@task(name="dvc-stage", task_run_name="{name}", retries=LOCK_RETRIES, retry_delay_seconds=20,
      retry_condition_fn=_is_transient)
def dvc_stage(name: str, parent_run_id: str) -> str:
    """`dvc repro --single-item NAME`; raises PipelineFailed with the output tail on failure."""
    logger = get_run_logger()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd=ROOT,
                            env=_env(parent_run_id), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:  # streamed, so long stages show progress as they go
        line = line.rstrip()
        if line:
            lines.append(line)
            logger.info(line)
    proc.wait()
    locked = [line for line in lines if any(marker in line for marker in DVC_LOCKED)]
    if proc.returncode != 0 and locked:
        raise PipelineFailed(f"stage '{name}': another `dvc repro` or `quillan run` is running in {ROOT} "
                             f"(DVC: {locked[0].removeprefix('ERROR: ').strip()}); this run stopped before "
                             f"changing anything. Run it again when the other one has finished.")
    if proc.returncode != 0:
        raise PipelineFailed(f"stage '{name}' failed (exit {proc.returncode}):\n" + "\n".join(lines[-60:]))
    skipped = "didn't change, skipping" in "\n".join(lines)
    create_markdown_artifact(key=name.replace("_", "-"), markdown=stage_markdown(name, skipped, parent_run_id),
                             description=f"Quillan stage {name}")
    return "skipped" if skipped else "ran"


def stage_markdown(name: str, skipped: bool, parent_run_id: str) -> str:
    """The Prefect artifact of one stage: status, link to its MLflow run, its key metrics."""
    link = None if skipped else stage_run_link(parent_run_id, name)
    lines = [f"## {name}", "", f"status: {'up to date (skipped by DVC)' if skipped else 'ran'}",
             f"MLflow run: {link}" if link else f"MLflow parent run: `{parent_run_id}`", ""]
    report = ROOT / "reports" / f"{name}.md"
    metrics = ROOT / "metrics" / f"{name}.json"
    if report.exists():  # the benchmark's summary table
        lines += [report.read_text(), ""]
    elif metrics.exists():
        lines += ["```json", metrics.read_text()[:4000], "```"]
    return "\n".join(lines)


def summary_markdown(preset: str, results: dict[str, str], parent_run_id: str) -> str:
    """The flow's final artifact: what ran, and the benchmark table when the run got that far."""
    lines = [f"# Quillan pipeline ({preset})", "", f"MLflow parent run: `{parent_run_id}`", "",
             "| stage | status |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in results.items()]
    report = ROOT / "reports" / "benchmark.md"
    if "benchmark" in results and report.exists():
        lines += ["", report.read_text()]
    return "\n".join(lines)


@flow(name=FLOW_NAME, log_prints=True)
def pipeline(preset: str | None = None, until: str | None = None,
             overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Run the DVC stages in order (optionally only up to `until`); returns stage → ran/skipped.

    `preset` and `overrides` (dotted keys, e.g. {"grpo.steps": 20}) are written into
    params.yaml first, validated, so that dvc.lock records what was run. A config error
    fails the flow before any stage runs.
    """
    order = stage_order()
    if until is not None and until not in order:
        raise PipelineFailed(f"unknown stage {until!r} (one of: {', '.join(order)})")
    try:
        check_tracking()
    except TrackingUnreachable as e:
        raise PipelineFailed(str(e)) from None
    stage = dvc_stage.with_options(retry_delay_seconds=lock_retry_delay_s())
    changed = write_params(preset=preset, overrides=overrides)
    if changed:
        print("params.yaml:", ", ".join(changed))
    params = load_params()
    results: dict[str, str] = {}
    with pipeline_run(params.preset) as run_id:
        try:
            for name in order:
                results[name] = stage(name, run_id)
                if name == until:
                    break
        finally:
            create_markdown_artifact(key="quillan-summary", markdown=summary_markdown(params.preset, results, run_id),
                                     description="Quillan pipeline run: stages and benchmark")
    print("pipeline:", ", ".join(f"{k}={v}" for k, v in results.items()))
    return results
