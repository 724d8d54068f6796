"""The grpo stage as users run it: resume after a kill to the same weights, and the rollback gate."""

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "flows.cli", "stage"]
GRPO = CLI + ["grpo", "--set", "grpo.steps=4", "--set", "grpo.checkpoint_every=1", "--set", "grpo.eval_size=16"]


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained_project(generated_project):
    return generated_project  # a finished smoke run: models/train is there


def test_killed_grpo_resumes_to_the_same_weights(trained_project):
    root, env = trained_project
    out = root / "models" / "grpo"
    run(GRPO, root, env)
    uninterrupted = _md5(out / "model.safetensors")
    assert not (out / "checkpoints").exists()
    subprocess.run(["rm", "-rf", str(out)], check=True)
    proc = subprocess.Popen(GRPO, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (out / "model.safetensors").exists()  # killed mid-run, nothing final
    resumed = run(GRPO, root, env)
    assert "grpo: resuming at step" in resumed.stdout + resumed.stderr
    assert _md5(out / "model.safetensors") == uninterrupted


def test_regressed_model_is_rolled_back(trained_project):
    root, env = trained_project
    # A learning rate this large wrecks the policy; the gate must keep the trained weights.
    proc = run(GRPO + ["--set", "grpo.lr=0.5", "--set", "grpo.lr_warmup_steps=0", "--set", "grpo.eval_size=64",
                       "--set", "grpo.rollback_tolerance=0.0"], root, env)
    metrics = json.loads((root / "metrics/grpo.json").read_text())
    before, after = metrics["before"]["accuracy"], metrics["after"]["accuracy"]
    assert after < before, (before, after)  # deterministic on the smoke preset
    assert metrics["rolled_back"] is True and "ROLLBACK" in proc.stdout
    assert _md5(root / "models/grpo/model.safetensors") == _md5(root / "models/train/model.safetensors")
    assert json.loads((root / "models/grpo/grpo.json").read_text())["rolled_back"] is True
