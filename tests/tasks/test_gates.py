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
    result = run_gate("data", [tmp_path / "train.jsonl"], params, tmp_path / "report.json", docs_dir=tmp_path / "docs")
    assert result.success, result.report()
    assert json.loads((tmp_path / "report.json").read_text())["success"] is True
    assert (tmp_path / "docs" / "index.html").exists() and result.docs == str(tmp_path / "docs" / "index.html")


def test_injected_faults_are_each_named(tmp_path, dataset):
    params, ds = dataset
    train = [dict(r) for r in ds.splits["train"]]
    train.append(dict(train[3]))                       # duplicate
    train[5]["answer"] = ""                             # empty answer
    train[6]["answer"] = train[6]["answer"] + "7"       # wrong answer
    train[7]["prompt"] = ds.splits["test"][0]["prompt"]  # leaked into test
    _write(tmp_path, {**ds.splits, "train": train})
    result = run_gate("data", [tmp_path / "train.jsonl"], params, docs_dir=tmp_path / "docs")
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
        run_gate("data", [tmp_path / "train.jsonl"], params, docs_dir=tmp_path / "docs")


def _whys(tmp_path, params, splits, name="faults", **kw):
    """The data gate on `splits` written to tmp_path/name: (result, {why: failure})."""
    sub = tmp_path / name
    sub.mkdir()
    _write(sub, splits)
    result = run_gate("data", [sub / "train.jsonl"], params, docs_dir=tmp_path / "docs", **kw)
    return result, {f["why"]: f for f in result.failures}


def test_every_data_expectation_fires_on_its_fault(tmp_path, dataset):
    """Each of the data suite's expectations, shown a row (or file) that breaks it, fails with its
    own reason and the offending line."""
    import json as _json

    from tasks.gates import GATES_DIR

    params, ds = dataset
    train = [dict(r) for r in ds.splits["train"]]
    faults = {8: ("prompt", 5, "prompt is not a string"), 9: ("answer", 7, "answer is not a string"),
              10: ("prompt", "", "empty prompt"), 11: ("domain", "poetry", "unknown domain"),
              12: ("difficulty", 4, "difficulty not in 1..3"),
              13: ("target", "x" * (params.data.max_chars + 1), "prompt+target length in characters out of bounds"),
              14: ("n_tokens", params.data.max_tokens + 1, "prompt+target length in tokens out of bounds")}
    for row, (key, value, _) in faults.items():
        train[row][key] = value
    result, whys = _whys(tmp_path, params, {**ds.splits, "train": train})
    for row, (_, _, why) in faults.items():
        assert why in whys, (why, sorted(whys))
        assert any(e.startswith(f"train.jsonl:{row + 1} ") for e in whys[why]["examples"]), (why, whys[why])
    seen = set(whys)

    # Columns missing from every row, and an empty file.
    stripped = [{k: v for k, v in r.items() if k not in ("id", "prompt", "answer", "target", "domain", "difficulty",
                                                          "verifier")} for r in ds.splits["train"]]
    _, whys = _whys(tmp_path, params, {"train": stripped}, name="stripped")
    assert whys["missing columns"]["examples"] == ["missing: answer, difficulty, domain, id, prompt, target, verifier"]
    seen |= set(whys)
    _, whys = _whys(tmp_path, params, {"train": [{k: v for k, v in r.items() if k != "target"}
                                                 for r in ds.splits["train"]]}, name="no_target")
    assert whys["missing columns"]["examples"] == ["missing: target"]
    _, whys = _whys(tmp_path, params, {"train": []}, name="empty")
    assert "file has no rows" in whys
    seen |= set(whys)

    # One domain nearly gone: the shares are far from balanced.
    lopsided = [r for r in ds.splits["train"] if r["domain"] != "math"] + \
        [r for r in ds.splits["train"] if r["domain"] == "math"][:2]
    _, whys = _whys(tmp_path, params, {"train": lopsided}, name="lopsided")
    assert "domain share too far from balanced" in whys
    seen |= set(whys)

    # Token counts recorded by another tokenizer than the one given.
    (tmp_path / "tok.json").write_text(ds.tokenizer.to_str())
    recount = [dict(r) for r in ds.splits["train"]]
    recount[2]["n_tokens"] += 1
    _, whys = _whys(tmp_path, params, {**ds.splits, "train": recount}, name="recount", tokenizer=tmp_path / "tok.json")
    why = "n_tokens differs from the count with data/tokenizer.json (tokenizer does not match the data)"
    assert list(whys) == [why] and whys[why]["unexpected_count"] == 1

    # Together with test_injected_faults_are_each_named: every expectation of the suite.
    suite = _json.loads((GATES_DIR / "data.json").read_text())
    covered = seen | {why, "duplicate prompt (after normalisation)", "empty answer", "answer fails its verifier",
                      "prompt also appears in another split (leakage)"}
    assert {e["meta"]["why"] for e in suite["expectations"]} <= covered


def test_calibration_model_and_export_gates_fail_on_bad_input(tmp_path, dataset):
    import json as _json

    import torch

    from quillan.checkpoint import save_model_dir
    from quillan.config import QuillanConfig
    from quillan.model import Quillan

    params, _ = dataset
    calib = tmp_path / "calibration.json"
    calib.write_text(_json.dumps({"modules": ["a", "b", "c"], "plan": {"a": "ternary", "c": "int3"},
                                  "layers": {"a": {"absmax": float("nan")}, "c": {"absmax": 1.0}}}))
    result = run_gate("calibration", [calib], params, docs_dir=tmp_path / "docs")
    whys = {f["why"]: f for f in result.failures}
    assert set(whys) == {"module missing from the precision plan", "unknown precision", "module has no statistics",
                         "non-finite statistic"}
    assert whys["non-finite statistic"]["examples"] == ['calibration.json: a {"absmax": NaN}']
    assert "calibration.json: b" in whys["module missing from the precision plan"]["examples"][0]

    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke"))
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight[0, 0] = float("inf")
    save_model_dir(tmp_path / "model", model)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    result = run_gate("model", [tmp_path / "model", tmp_path / "broken"], params, docs_dir=tmp_path / "docs")
    whys = {f["why"]: f for f in result.failures}
    assert set(whys) == {"model directory does not load", "non-finite weights"}
    assert f"{tmp_path / 'model'}: blocks.0.attn.q_proj.weight shape=(64, 64)" in whys["non-finite weights"]["examples"]
    assert whys["non-finite weights"]["unexpected_count"] == 2  # that tensor, and the directory that does not load
    assert "config.json: not valid JSON" in whys["model directory does not load"]["examples"][0]

    from quillan.export import ExportConfig, convert, save

    exported, plan = convert(Quillan(QuillanConfig.preset("smoke")), "ternary", ExportConfig())
    save(exported, tmp_path / "export" / "ternary", "ternary", plan, {})
    (tmp_path / "export" / "ternary" / "metadata.json").write_text("{}")  # broken metadata
    result = run_gate("export", [tmp_path / "export"], params, docs_dir=tmp_path / "docs")
    whys = {f["why"] for f in result.failures}
    assert "export does not load from disk" in whys and not result.success


@pytest.mark.parametrize("name", ["data", "calibration", "model", "export"])
def test_every_expectation_of_a_suite_file_is_loaded(name):
    """GX merges expectations it takes for equivalent (seven `expect_column_to_exist` became one):
    the loaded suite must hold every expectation its JSON lists."""
    from tasks.gates import GATES_DIR, load_suite

    spec = json.loads((GATES_DIR / f"{name}.json").read_text())
    assert len(load_suite(name).expectations) == len(spec["expectations"])
