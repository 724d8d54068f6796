import json
import subprocess
import sys

import pytest

from quillan.data import build_dataset
from tasks.common import write_jsonl
from tasks.gates import run_gate
from tasks.params import load_params


@pytest.fixture(scope="module")
def dataset():
    params = load_params(preset="smoke", overrides={"data.n_per_domain": 120})
    return params, build_dataset(params.data, seed=0)


def _write(dirpath, splits):
    for name, rows in splits.items():
        write_jsonl(dirpath / f"{name}.jsonl", rows)


def test_clean_data_passes(tmp_path, dataset):
    params, ds = dataset
    _write(tmp_path, ds.splits)
    result = run_gate("data", [tmp_path / "train.jsonl"], params, tmp_path / "report.json")
    assert result.success, result.report()
    assert json.loads((tmp_path / "report.json").read_text())["success"] is True


def test_injected_faults_are_each_named(tmp_path, dataset):
    params, ds = dataset
    train = [dict(r) for r in ds.splits["train"]]
    train.append(dict(train[3]))                       # duplicate
    train[5]["answer"] = ""                             # empty answer
    train[6]["answer"] = train[6]["answer"] + "7"       # wrong answer
    train[7]["prompt"] = ds.splits["test"][0]["prompt"]  # leaked into test
    _write(tmp_path, {**ds.splits, "train": train})
    result = run_gate("data", [tmp_path / "train.jsonl"], params)
    assert not result.success
    whys = {f["why"]: f for f in result.failures}
    assert whys["duplicate prompt (after normalisation)"]["unexpected_count"] == 2
    assert "train.jsonl:4 " in whys["duplicate prompt (after normalisation)"]["examples"][0]
    assert whys["empty answer"]["unexpected_count"] == 1
    assert "train.jsonl:6 " in whys["empty answer"]["examples"][0]
    verifier_lines = " ".join(whys["answer fails its verifier"]["examples"])
    assert "train.jsonl:6 " in verifier_lines and "train.jsonl:7 " in verifier_lines
    assert "prompt also appears in another split (leakage)" in whys
    report = result.report()
    assert "FAILED" in report and "train.jsonl:7" in report


def test_cli_exit_codes(tmp_path, dataset):
    params, ds = dataset
    _write(tmp_path, ds.splits)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("preset: smoke\ndata:\n  n_per_domain: 120\n")
    cmd = [sys.executable, "-m", "flows.cli", "validate", "--params", str(params_file), "data"]
    ok = subprocess.run(cmd + [str(tmp_path / "val.jsonl")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    rows = ds.splits["val"][:]
    rows[0] = {**rows[0], "answer": ""}
    write_jsonl(tmp_path / "val.jsonl", rows)
    bad = subprocess.run(cmd + [str(tmp_path / "val.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "empty answer" in bad.stderr and "val.jsonl:1" in bad.stderr
    missing = subprocess.run(cmd + [str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.jsonl: file not found" in missing.stderr


def test_truncated_jsonl_line_is_named(tmp_path, dataset):
    params, ds = dataset
    _write(tmp_path, ds.splits)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write('{"prompt": "What is\n')
    n = len(ds.splits["train"]) + 1
    with pytest.raises(ValueError, match=f"train.jsonl:{n}: not valid JSON"):
        run_gate("data", [tmp_path / "train.jsonl"], params)
