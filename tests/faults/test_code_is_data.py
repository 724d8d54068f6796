"""Generated code is data: no string from a data file is ever executed, and a hostile
expression tree cannot make the verifier run code, allocate gigabytes or recurse forever."""

import json
import sys

import pytest

from quillan.data.code_expr import evaluate
from quillan.data.verify import verify_record
from tests.conftest import run

CANARY = "/tmp/quillan-pwned-canary"
PAYLOAD = f"__import__('os').system('touch {CANARY}')"


@pytest.mark.parametrize("expr", [
    ["call", "__import__", ["lit", "os"]],               # a function outside the whitelist
    ["method", "system", ["lit", "os"], ["lit", "x"]],  # a method outside the whitelist
    PAYLOAD,                                            # a source string where a tree belongs
    ["bin", "*", ["lit", "x"], ["lit", 10**12]],        # a terabyte string
])
def test_hostile_expressions_are_rejected_not_run(expr, tmp_path):
    record = {"prompt": f"What does {PAYLOAD} evaluate to?", "answer": "0", "target": "Answer: 0",
              "verifier": {"kind": "code", "expr": expr}}
    assert verify_record(record) is False
    assert not __import__("os").path.exists(CANARY)


def test_deep_nesting_is_refused():
    node = ["lit", 1]
    for _ in range(200):
        node = ["bin", "+", node, ["lit", 1]]
    with pytest.raises(ValueError, match="nested deeper"):
        evaluate(node)


def test_a_malicious_row_fails_the_gate_and_is_never_evaluated(generated_data_copy):
    root, env = generated_data_copy
    path = root / "data/generated/train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    code = next(r for r in rows if r["domain"] == "code")
    evil = dict(code, id="evil", prompt=f"What does {PAYLOAD} return?", answer="0", target="Answer: 0",
                verifier={"kind": "code", "expr": PAYLOAD})
    path.write_text(path.read_text() + json.dumps(evil) + "\n")
    proc = run([sys.executable, "-m", "flows.cli", "validate", "data", str(path)], root, env, check=False)
    assert proc.returncode == 1
    assert f"train.jsonl:{len(rows) + 1} " in proc.stderr and "answer fails its verifier" in proc.stderr
    assert not __import__("os").path.exists(CANARY)
