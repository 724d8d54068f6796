"""Bad configuration stops everything before any stage runs, with one line naming the key."""

import sys

import pytest

from tests.conftest import run

CASES = {  # section of params.yaml → its bad content, and the one line that must name it
    "unknown key": (("grpo", "{stepz: 3}"),
                    "config error: params.yaml: unknown key 'grpo.stepz' (allowed: enabled, steps, prompts_per_step,"),
    "wrong type": (("train", "{lr: fast}"),
                   "config error: params.yaml: train.lr: Input should be a valid number, unable to parse string as a "
                   "number (got 'fast')"),
    "out of range": (("data", "{n_per_domain: -5}"),
                     "config error: params.yaml: data.n_per_domain: Input should be greater than or equal to 3 (got -5)"),
    "not an allowed value": (("train", "{precision: fp8}"),
                             "config error: params.yaml: train.precision: Input should be '32-true', '16-mixed' or "
                             "'bf16-mixed' (got 'fp8')"),
    "contradiction": (("model", "{council_top_k: 9}"),
                      "config error: params.yaml: model: Value error, model.council_top_k (9) must be <= "
                      "model.n_council (2)"),
}


def _break(root, section: str, content: str) -> None:
    """Replace section `section` of the copy's params.yaml (`{}` or an indented block) by `content`
    (every section stays: DVC reads them all)."""
    params = root / "params.yaml"
    lines = params.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{section}:"))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    params.write_text("\n".join(lines[:start] + [f"{section}: {content}"] + lines[end:]) + "\n")


@pytest.mark.parametrize("change, message", CASES.values(), ids=CASES.keys())
def test_bad_params_stop_the_run_before_any_stage(project, change, message):
    root, env = project
    _break(root, *change)
    proc = run([sys.executable, "-m", "flows.cli", "run"], root, env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(message) and "\n" not in lines[-1]
    assert not (root / "dvc.lock").exists() and not (root / "data/generated").exists()
    assert not (root / "mlflow.db").exists()  # not even a tracking run was opened


def test_unknown_preset_names_the_presets_that_exist(project):
    root, env = project
    proc = run([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny"], root, env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "config error: params.yaml: preset: unknown preset 'tiny' (one of: cpu, gpu, smoke)"
    assert "preset: smoke" in (root / "params.yaml").read_text()  # not rewritten


def test_dvc_repro_stops_at_the_first_stage_with_the_same_line(project):
    root, env = project
    _break(root, *CASES["contradiction"][0])
    proc = run([sys.executable, "-m", "dvc", "repro"], root, env, check=False)
    assert proc.returncode != 0
    assert CASES["contradiction"][1] in proc.stdout + proc.stderr
    assert not (root / "dvc.lock").exists() and not (root / "data/generated").exists()
