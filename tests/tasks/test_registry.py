"""The MLflow registry round trip against the sqlite store: register an export as `quillan`,
aliases champion/challenger, and load it by alias in a fresh process (models from code, no pickle)."""

import ast
import copy
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

from quillan.config import QuillanConfig
from quillan.data.generators import generate_tasks
from quillan.data.tokenizer import train_tokenizer, training_text
from quillan.export import ExportConfig, convert, save
from quillan.model import Quillan


@pytest.fixture
def export_dir(tmp_path):
    records = generate_tasks(24, 0, 0.3)
    tok = train_tokenizer((training_text(r) for r in records), vocab_size=320)
    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke", vocab_size=tok.get_vocab_size()))
    model, plan = convert(copy.deepcopy(model), "ternary", ExportConfig())
    save(model, tmp_path / "ternary", "ternary", plan, {}, tok)
    return tmp_path / "ternary"


def test_register_aliases_and_fresh_process_predict(export_dir, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("QUILLAN_PARENT_RUN_ID", raising=False)
    from tasks.benchmark import register
    from tasks.tracking import stage_run

    with stage_run("benchmark", {}) as tracker:
        assert register(tracker, "ternary", export_dir, 0.5, "accuracy") == "quillan v1 @champion"
    with stage_run("benchmark", {}) as tracker:  # worse on the primary metric: challenger
        assert register(tracker, "ternary", export_dir, 0.4, "accuracy") == "quillan v2 @challenger"
    with stage_run("benchmark", {}) as tracker:
        assert register(tracker, "ternary", export_dir, 0.6, "accuracy") == "quillan v3 @champion"
    code = ("import mlflow; m = mlflow.pyfunc.load_model('models:/quillan@champion'); "
            "out = m.predict(['12+30=']); short = m.predict(['12+30='], params={'max_new_tokens': 1}); "
            "print(repr((out, short, sorted(p.name for p in m.metadata.get_params_schema().params))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUILLAN")}
    env["MLFLOW_TRACKING_URI"] = uri
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, short, params = ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # the repr we printed
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert params == ["max_new_tokens", "temperature"]  # declared: MLflow passes them through
    assert "params` can only be specified" not in proc.stderr
    tok = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    assert len(tok.encode(short[0]).ids) <= 1 < len(tok.encode(out[0]).ids) or out[0] == short[0]
