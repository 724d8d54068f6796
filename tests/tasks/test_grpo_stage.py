"""The grpo stage as users run it: resume after a kill to the same weights, and the rollback gate."""

import hashlib
import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import copy_project, interrupt_when, run

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "flows.cli", "stage"]
GRPO = CLI + ["grpo", "--set", "grpo.steps=4", "--set", "grpo.checkpoint_every=1", "--set", "grpo.eval_size=16"]


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained_project(generated_project):
    return generated_project  # a finished smoke run: models/train is there


def _checkpoint_step(state):
    try:
        return json.loads(state.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_interrupted_grpo_resumes_to_the_same_weights(trained_project):
    """SIGTERM after the first checkpoint, SIGKILL of the resumed run after a later one, then a
    third run: the same bytes as one uninterrupted run."""
    root, env = trained_project
    out = root / "models" / "grpo"
    run(GRPO, root, env)
    uninterrupted = _md5(out / "model.safetensors")
    metrics = json.loads((root / "metrics/grpo.json").read_text())
    for when in ("pass_at_g_before", "pass_at_g_after"):  # smoke: pass_at_size 16, G = group_size 4
        p = metrics[when]
        assert p["k"] == 4 and sum(f["n"] for f in p["by_task"].values()) == 16, when
        assert all(0 <= f["pass_at_1"] <= f["pass_at_k"] <= 1 for f in p["by_task"].values()), when
        assert all(0 <= f["maj_at_k"] <= f["pass_at_k"] for f in p["by_task"].values()), when
    prior = metrics["pass_at_g_prior"]
    assert set(prior["by_task"]) == set(metrics["pass_at_g_before"]["by_task"]) and 0 <= prior["pass_at_k"] <= 1
    assert not (out / "checkpoints").exists()
    subprocess.run(["rm", "-rf", str(out)], check=True)
    state = out / "checkpoints" / "last" / "state.json"

    code, stderr = interrupt_when(GRPO, root, env, state.exists, signal.SIGTERM)
    assert code == 143, stderr[-2000:]
    assert "stage grpo interrupted by SIGTERM" in stderr.strip().splitlines()[-1]
    assert state.exists() and not (out / "model.safetensors").exists()
    assert not [p for p in root.glob("models/**/*") if p.name.endswith(".tmp")]
    first = _checkpoint_step(state)

    code, _ = interrupt_when(GRPO, root, env, lambda: _checkpoint_step(state) > first, signal.SIGKILL)
    assert code == -signal.SIGKILL and not (out / "model.safetensors").exists()

    resumed = run(GRPO, root, env)
    assert "grpo: resuming at step" in resumed.stdout + resumed.stderr
    assert _md5(out / "model.safetensors") == uninterrupted


def test_regressed_model_is_rolled_back(trained_project, tmp_path):
    from quillan.checkpoint import load_model_dir
    from quillan.data.tokenizer import prompt_text
    from quillan.data.verify import extract_answer
    from quillan.inference import complete
    from tasks.common import read_jsonl, write_jsonl

    root, env = copy_project(trained_project[0], tmp_path / "quillan")
    # The smoke model answers no val record right, so nothing could regress: the val split here
    # holds its own greedy answers (what a model that solved val would look like), and a learning
    # rate this large wrecks the policy. The gate, reading val, must keep the trained weights.
    model, tok = load_model_dir(root / "models/train")
    val_path = root / "data/generated/val.jsonl"
    val = read_jsonl(val_path)
    answers = complete(model, tok, [prompt_text(r) for r in val], 32)
    write_jsonl(val_path, [{**r, "answer": extract_answer(a)} for r, a in zip(val, answers)])
    proc = run(GRPO + ["--set", "grpo.lr=0.5", "--set", "grpo.lr_warmup_steps=0", "--set", "grpo.eval_size=0",
                       "--set", "grpo.rollback_tolerance=0.0", "--set", "grpo.rollback_z=0"], root, env)
    metrics = json.loads((root / "metrics/grpo.json").read_text())
    before, after = metrics["val_before"]["accuracy"], metrics["val_after"]["accuracy"]
    assert before > 0.9 and after < before, (before, after)  # deterministic on the smoke preset
    assert metrics["rolled_back"] is True and "ROLLBACK" in proc.stdout
    assert _md5(root / "models/grpo/model.safetensors") == _md5(root / "models/train/model.safetensors")
    assert json.loads((root / "models/grpo/grpo.json").read_text())["rolled_back"] is True


def test_rollback_tolerance_is_the_floor_or_z_paired_standard_errors():
    import math

    from tasks.grpo import rollback_tolerance

    # 512 records: 30 lost, 18 gained, the rest unchanged. d has mean -12/512 and sample variance
    # (48 − 512·(12/512)²) / 511; its standard error sqrt(var / 512).
    before = [1] * 30 + [0] * 18 + [1] * 100 + [0] * 364
    after = [0] * 30 + [1] * 18 + [1] * 100 + [0] * 364
    se = math.sqrt((48 - 12**2 / 512) / 511 / 512)
    assert rollback_tolerance(before, after, 0.01, 1.96) == pytest.approx(1.96 * se)  # 0.0266
    # Unpaired, two accuracies near 0.25 on 512 records would give 1.96 · 0.0271 = 0.053.
    assert rollback_tolerance(before, after, 0.10, 1.96) == 0.10       # the floor when larger
    assert rollback_tolerance(before, after, 0.01, 0.0) == 0.01        # z = 0: the fixed tolerance alone
    assert rollback_tolerance(before, before, 0.0, 1.96) == 0.0        # nothing changed: any drop counts
    with pytest.raises(ValueError, match="not the same records"):
        rollback_tolerance(before, after[:-1], 0.0, 1.96)
