"""Bad or missing data fails the gate, naming the file and the line, and records nothing."""

import json
import shutil
import sys

import pytest

from tests.conftest import run

SPLITS = ["data/generated/train.jsonl", "data/generated/val.jsonl", "data/generated/test.jsonl"]


@pytest.fixture
def data_copy(generated_data_copy):
    return generated_data_copy


def _validate(root, env):
    return run([sys.executable, "-m", "flows.cli", "validate", "data", *SPLITS], root, env, check=False)


def test_truncated_line_names_file_and_line(data_copy):
    root, env = data_copy
    path = root / SPLITS[0]
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]]) + "\n")  # a write cut short
    proc = _validate(root, env)
    assert proc.returncode == 2
    assert f"train.jsonl:{len(lines)}: not valid JSON" in proc.stderr.strip().splitlines()[-1]


def test_wrong_column_type_and_empty_split_fail_the_gate_by_row(data_copy):
    root, env = data_copy
    train = root / SPLITS[0]
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[4]["answer"] = 42  # a number where the schema wants a string
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / SPLITS[2]).write_text("")
    proc = _validate(root, env)
    assert proc.returncode == 1
    assert "answer is not a string" in proc.stderr and "train.jsonl:5 " in proc.stderr
    only_test = run([sys.executable, "-m", "flows.cli", "validate", "data", SPLITS[2]], root, env, check=False)
    assert only_test.returncode == 1 and "file has no rows" in only_test.stderr


def test_a_tokenizer_that_does_not_match_the_data_fails_the_gate(data_copy):
    root, env = data_copy
    from quillan.data.tokenizer import train_tokenizer

    # A tokenizer trained on other text: every recorded n_tokens disagrees with its counts.
    other = train_tokenizer((f"unrelated text number {i} " * 3 for i in range(500)), vocab_size=300)
    other.save(str(root / "data/tokenizer.json"))
    proc = _validate(root, env)
    assert proc.returncode == 1
    assert "tokenizer does not match the data" in proc.stderr and "train.jsonl:1 " in proc.stderr


def test_dvc_repro_stops_at_the_failing_gate_and_records_nothing(data_copy):
    root, env = data_copy
    lock = (root / "dvc.lock").read_text()
    suite = root / "gates/data.json"
    spec = json.loads(suite.read_text())
    spec["expectations"][0]["kwargs"]["min_value"] = 10**6
    suite.write_text(json.dumps(spec))
    proc = run([sys.executable, "-m", "dvc", "repro"], root, env, check=False)
    assert proc.returncode != 0 and "Running stage 'gate_data'" in proc.stdout
    assert "Running stage 'calibrate'" not in proc.stdout
    assert (root / "dvc.lock").read_text() == lock
    shutil.rmtree(root / "data/generated")
    missing = _validate(root, env)
    assert missing.returncode == 2 and "train.jsonl" in missing.stderr
