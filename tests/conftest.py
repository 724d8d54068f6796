import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=SRC,
                         capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if (SRC / f).is_file()]


@pytest.fixture
def project(tmp_path):
    """A fresh git clone-like copy of this project (its code, not its outputs), preset smoke.

    Returns (root, env): run commands with cwd=root and env=env so the copy's code is used.
    """
    return make_project(tmp_path / "quillan")


@pytest.fixture(scope="module")
def generated_project(tmp_path_factory):
    """A project copy (smoke preset) in which `generate` and its gate have already run."""
    root, env = make_project(tmp_path_factory.mktemp("proj") / "quillan")
    run([sys.executable, "-m", "dvc", "repro", "gate_data"], root, env)
    return root, env


def make_project(root: Path):
    for rel in _project_files():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SRC / rel, dest)
    for out in ("dvc.lock", "metrics", "reports", "plots", "models", "data/generated", "data/tokenizer.json"):
        p = root / out
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("preset: cpu", "preset: smoke"))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("QUILLAN_PARENT_RUN_ID", None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "copy"], cwd=root, check=True)
    return root, env


def run(cmd, root, env, check=True):
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
