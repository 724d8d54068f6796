"""The Quillan pipeline as one Prefect flow that drives DVC's stages in dvc.yaml order.

The flow does not reimplement the DAG: each Prefect task runs `dvc repro --single-item
<stage>`, so `quillan run` and `dvc repro` share one cache and one dvc.lock, and an
unchanged stage is skipped by DVC in both. Gates are DVC stages too; a failing gate fails
its task, the flow run, and nothing after it runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import ROOT
from tasks.params import PARAMS_FILE, load_params
from tasks.tracking import PARENT_ENV, pipeline_run


class PipelineFailed(RuntimeError):
    """A stage or gate failed; the message carries its output tail (the gate report)."""


def stage_order(dvc_file: Path = ROOT / "dvc.yaml") -> list[str]:
    """DVC stage names in the order dvc.yaml lists them (written in dependency order)."""
    return list((yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}))


def set_preset(preset: str, params_file: Path = PARAMS_FILE) -> None:
    """Rewrite the `preset:` line of params.yaml in place, keeping comments and the rest."""
    text = params_file.read_text()
    new, n = re.subn(r"(?m)^preset:.*$", f"preset: {preset}", text)
    if n == 0:
        new = f"preset: {preset}\n" + text
    if new != text:
        params_file.write_text(new)


def _env(parent_run_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env[PARENT_ENV] = parent_run_id
    # dvc.yaml calls `quillan ...`: make this interpreter's scripts first on PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@task(name="dvc-stage", task_run_name="{name}", retries=0)
def dvc_stage(name: str, parent_run_id: str) -> str:
    """`dvc repro --single-item NAME`; raises PipelineFailed with the output tail on failure.

    No retries: stages are deterministic, so a failure would fail again the same way.
    """
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
    out = "\n".join(lines)
    if proc.returncode != 0:
        raise PipelineFailed(f"stage '{name}' failed (exit {proc.returncode}):\n" + "\n".join(lines[-60:]))
    skipped = "didn't change, skipping" in out
    create_markdown_artifact(key=name.replace("_", "-"), markdown=_stage_markdown(name, skipped, parent_run_id),
                             description=f"Quillan stage {name}")
    return "skipped" if skipped else "ran"


def _stage_markdown(name: str, skipped: bool, parent_run_id: str) -> str:
    metrics = ROOT / "metrics" / f"{name}.json"
    lines = [f"## {name}", "", f"status: {'up to date (skipped by DVC)' if skipped else 'ran'}",
             f"MLflow parent run: `{parent_run_id}`", ""]
    report = ROOT / "reports" / f"{name}.md"
    if report.exists():  # the benchmark's summary table
        lines += [report.read_text(), ""]
    elif metrics.exists():
        lines += ["```json", metrics.read_text()[:4000], "```"]
    return "\n".join(lines)


@flow(name="quillan-pipeline", log_prints=True)
def pipeline(preset: str | None = None, until: str | None = None) -> dict[str, str]:
    """Run the DVC stages in order (optionally only up to `until`); returns stage → ran/skipped."""
    params = load_params(preset=preset)  # config errors stop the flow before any stage
    if preset:
        set_preset(preset)
    order = stage_order()
    if until is not None and until not in order:
        raise PipelineFailed(f"unknown stage {until!r} (one of: {', '.join(order)})")
    results: dict[str, str] = {}
    with pipeline_run(params.preset) as run_id:
        for name in order:
            results[name] = dvc_stage(name, run_id)
            if name == until:
                break
    print("pipeline:", ", ".join(f"{k}={v}" for k, v in results.items()))
    return results
