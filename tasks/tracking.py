"""MLflow bookkeeping for stages: one parent run per pipeline run, one nested run per stage.

Default store: sqlite `mlflow.db` at the repo root with artifacts in `mlartifacts/`;
`MLFLOW_TRACKING_URI` overrides it. A stage finds its parent through the environment
variable `QUILLAN_PARENT_RUN_ID`, set by the Prefect flow; run alone, a stage's run is
top-level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

from tasks.common import ROOT, leaves, numeric_leaves

EXPERIMENT = "quillan"
PARENT_ENV = "QUILLAN_PARENT_RUN_ID"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


class TrackingUnreachable(RuntimeError):
    """The MLflow store named by MLFLOW_TRACKING_URI cannot be used; str() says which and why."""


def check_tracking(timeout_s: float = 5.0) -> None:
    """Fail within seconds, before any compute, when the MLflow store cannot be reached.

    MLflow's own client retries an unreachable server with backoff for minutes, and a stage logs
    its results at the end: without this check an hour of training would be lost at the last step.
    """
    uri = tracking_uri()
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "default store"
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return  # it answered (auth proxies, no /health route): reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnreachable(f"MLflow tracking server {uri} ({source}) is unreachable: {reason}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingUnreachable(f"MLflow store {uri} ({source}): folder {folder} does not exist or is not writable")


def _mlflow():
    import mlflow  # ~2 s import: only stages that log pay for it

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def experiment_id() -> str:
    """Id of the `quillan` experiment, created with artifacts under mlartifacts/ if missing."""
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if tracking_uri().startswith("sqlite:///"):  # artifacts next to the database file
        artifacts = (Path(tracking_uri()[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    except Exception:  # created concurrently by another process
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def file_md5(path: Path) -> str:
    """Hex md5 of a file's bytes: what DVC records for it."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def stage_deps(stage: str) -> list[str]:
    """The `deps` of `stage` in dvc.yaml (what DVC re-runs it for, and what its MLflow run is
    tagged with); [] for a name dvc.yaml does not have."""
    stages = (yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}).get("stages", {})
    return [str(d) for d in (stages.get(stage) or {}).get("deps", [])]


def dvc_hashes(paths: list[str]) -> dict[str, str]:
    """DVC's md5 of each input: files hashed here (DVC 3 hashes file bytes), directories
    taken from dvc.lock (their `.dir` hash); missing paths are skipped."""
    locked: dict[str, str] = {}
    lock = ROOT / "dvc.lock"
    if lock.exists():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            for entry in stage.get("outs", []) + stage.get("deps", []):
                if "md5" in entry:
                    locked[entry["path"]] = entry["md5"]
    out = {}
    for rel in paths:
        p = ROOT / rel
        if p.is_file():
            out[rel] = file_md5(p)
        elif p.is_dir() and rel in locked:
            out[rel] = locked[rel]
    return out


def flat_params(tree: dict[str, Any]) -> dict[str, str]:
    """Nested params as MLflow params: {"a.b": value}, non-strings JSON-encoded."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in leaves(tree, ".").items()}


class StageRun:
    """Handle given to a stage: log metrics/artifacts into its MLflow run."""

    def __init__(self, mlflow, run):
        self.mlflow, self.run = mlflow, run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.mlflow.log_metrics(numeric_leaves(metrics), step=step)

    def log_artifact(self, path: Path | str, subdir: str | None = None) -> None:
        if Path(path).exists():
            self.mlflow.log_artifact(str(path), artifact_path=subdir)


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[StageRun]:
    """An MLflow run for one stage (a dvc.yaml stage name) with its params, git commit and the
    hashes of its dvc.yaml deps (`dvc.md5.<path>` tags) logged."""
    mlflow = _mlflow()
    parent = os.environ.get(PARENT_ENV)
    tags = {"quillan.stage": stage, "mlflow.source.git.commit": git_commit()}
    for rel, md5 in dvc_hashes(stage_deps(stage)).items():
        tags[f"dvc.md5.{rel}"] = md5
    with mlflow.start_run(experiment_id=experiment_id(), run_name=stage, parent_run_id=parent,
                          nested=parent is not None, tags=tags) as run:
        mlflow.log_params(flat_params(params))
        yield StageRun(mlflow, run)


@contextlib.contextmanager
def pipeline_run(preset: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """The parent run of a whole pipeline run; yields its id (exported to stages via env)."""
    mlflow = _mlflow()
    with mlflow.start_run(experiment_id=experiment_id(), run_name=f"pipeline-{preset}",
                          tags={"quillan.preset": preset, "mlflow.source.git.commit": git_commit(), **(tags or {})}) as run:
        yield run.info.run_id


def stage_run_link(parent_run_id: str, stage: str) -> str | None:
    """Where to see the latest MLflow run of `stage` under `parent_run_id`, or None if it has none.

    A URL when the tracking server is http(s); otherwise the `mlflow ui` URL (its default
    address) and the run id, since a sqlite store has no address of its own.
    """
    mlflow = _mlflow()
    runs = mlflow.search_runs(experiment_ids=[experiment_id()], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                            f"and tags.mlflow.runName = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0].info
    base = tracking_uri() if tracking_uri().startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
