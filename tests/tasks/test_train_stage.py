"""The train stage as users run it: resume after a kill, non-finite stop, two-process DDP."""

import hashlib
import signal
import subprocess
import sys

import pytest
import yaml

from tests.conftest import interrupt_when, run

pytestmark = pytest.mark.slow
STAGE = [sys.executable, "-m", "flows.cli", "stage", "train", "--set", "train.fp_reference=false"]


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_interrupted_runs_resume_to_the_same_weights(generated_project):
    """SIGTERM after the first checkpoint, SIGKILL of the resumed run after a later one, then a
    third run: the same bytes as one uninterrupted run, and no final output in between."""
    root, env = generated_project
    out = root / "models" / "train"
    run(STAGE, root, env)
    uninterrupted = _md5(out / "model.safetensors")
    assert not (out / "checkpoints").exists()  # removed on success
    subprocess.run(["rm", "-rf", str(out)], check=True)
    ckpt = out / "checkpoints" / "ternary" / "last.ckpt"

    code, stderr = interrupt_when(STAGE, root, env, ckpt.exists, signal.SIGTERM)
    assert code == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("stage train interrupted by SIGTERM: no output was written")
    assert ckpt.exists() and not (out / "model.safetensors").exists()
    assert not [p for p in root.glob("models/**/*") if p.name.endswith(".tmp")]  # temporaries cleaned up
    first = ckpt.stat().st_mtime_ns

    code, _ = interrupt_when(STAGE, root, env, lambda: ckpt.exists() and ckpt.stat().st_mtime_ns != first,
                             signal.SIGKILL)
    assert code == -signal.SIGKILL and not (out / "model.safetensors").exists()

    resumed = run(STAGE, root, env)
    assert "resuming ternary" in resumed.stdout
    assert _md5(out / "model.safetensors") == uninterrupted


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(generated_project):
    root, env = generated_project
    subprocess.run(["rm", "-rf", str(root / "models" / "train")], check=True)
    proc = run(STAGE + ["--set", "train.lr=100", "--set", "train.checkpoint_every=2"], root, env, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("stage train failed: ternary: non-finite loss") and "at step 4" in last
    assert "last good checkpoint kept: models/train/checkpoints/ternary/last.ckpt" in last
    assert (root / "models/train/checkpoints/ternary/last.ckpt").exists()
    assert not (root / "models/train/model.safetensors").exists()


def test_two_process_cpu_ddp_through_dvc_repro(generated_project):
    root, env = generated_project
    subprocess.run(["rm", "-rf", str(root / "models" / "train")], check=True)
    from tasks.params import write_params

    write_params(root / "params.yaml", overrides={"train.strategy": "ddp", "train.devices": 2, "train.max_steps": 8,
                                                  "train.fp_reference": False})
    proc = run([sys.executable, "-m", "dvc", "repro", "train"], root, env)
    assert "Starting with 2 processes" in proc.stdout + proc.stderr  # Lightning DDP over gloo
    assert "Running stage 'train'" in proc.stdout
    assert (root / "models/train/model.safetensors").exists()
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"]["train"]
    assert locked == {"strategy": "ddp", "devices": 2, "max_steps": 8, "fp_reference": False}
