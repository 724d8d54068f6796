"""End to end on the smoke preset: two fresh clones, one run through the Prefect flow and one
through plain `dvc repro`, side by side; then reproducibility, MLflow, gates, experiments."""

import json
import math
import re
import sys

import pytest
import yaml

from quillan import kernels
from tests.conftest import copy_project, run

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]
# What may differ between two runs of the same params on the same machine: wall-clock speeds
# and memory. They live only in metrics/plots/reports files that DVC does not cache.
TIME_DEPENDENT = re.compile(r"(seconds|tokens_per_s|rss_bytes)")
TIME_DEPENDENT_FILES = {"metrics/train.json", "metrics/grpo.json", "metrics/benchmark.json",
                        "plots/benchmark_speed_size.png", "reports/benchmark.md"}


def _lock(root):
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def _outs(lock, stage):
    return {o["path"]: o["md5"] for o in lock[stage]["outs"]}


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def test_two_clones_produce_byte_identical_artifacts(smoke_runs):
    (a, _, _), (b, _, _) = smoke_runs["a"], smoke_runs["b"]
    lock_a, lock_b = _lock(a), _lock(b)
    assert set(lock_a) == set(lock_b)
    differing = set()
    for stage in lock_a:
        for kind in ("deps", "outs"):
            hashes_a = {e["path"]: e["md5"] for e in lock_a[stage].get(kind, [])}
            hashes_b = {e["path"]: e["md5"] for e in lock_b[stage].get(kind, [])}
            assert set(hashes_a) == set(hashes_b)
            differing |= {p for p in hashes_a if hashes_a[p] != hashes_b[p]}
    assert differing <= TIME_DEPENDENT_FILES, differing
    # Data, tokenizer, calibration, both trained models, the GRPO model and every export:
    for out in ("data/generated", "data/tokenizer.json", "models/calibration.json", "models/train", "models/grpo",
                "models/export"):
        assert out not in differing
    meta = json.loads((a / "models/export/ternary/metadata.json").read_text())
    assert meta["ternary_kernel_path"] == (kernels.path() or f"none ({kernels.unavailable_reason()})")
    for name in ("generate", "calibrate", "train", "grpo", "export", "benchmark"):
        ma = dict(_leaves(json.loads((a / f"metrics/{name}.json").read_text())))
        mb = dict(_leaves(json.loads((b / f"metrics/{name}.json").read_text())))
        assert ma.keys() == mb.keys()
        assert {k: v for k, v in ma.items() if not TIME_DEPENDENT.search(k)} == \
            {k: v for k, v in mb.items() if not TIME_DEPENDENT.search(k)}, name


def test_pipeline_flow_dvc_and_gate(smoke_runs, tmp_path):
    root, env, (stdout, stderr) = smoke_runs["a"]
    dvc = DVC

    # 1. The Prefect flow ran every stage through DVC, under one parent MLflow run.
    assert "generate=ran" in stdout + stderr
    for rel in ("data/generated/train.jsonl", "data/generated/val.jsonl", "data/generated/test.jsonl",
                "data/tokenizer.json", "metrics/generate.json", "plots/generate_lengths.png",
                "reports/gates/data.json", "reports/gates/data/index.html"):
        assert (root / rel).exists(), rel
    lock = _lock(root)
    assert set(lock) >= {"generate", "gate_data", "calibrate", "gate_calibration", "train", "gate_train", "grpo",
                         "gate_grpo", "export", "gate_export", "benchmark"}
    train_metrics = json.loads((root / "metrics/train.json").read_text())
    vocab = json.loads((root / "models/train/config.json").read_text())["vocab_size"]
    # Guessing uniformly scores ln(vocab) nats (5.95 for 384); the smoke run learns well below
    # it (3.8 measured): at least 1.5 nats better than guessing, for both models.
    assert train_metrics["ternary"]["val_loss"] < math.log(vocab) - 1.5
    assert train_metrics["reference"]["val_loss"] < math.log(vocab) - 1.5
    for rel in ("models/train/model.safetensors", "models/train/reference/model.safetensors", "models/calibration.json",
                "plots/train_loss.png", "plots/train_lambda.png", "plots/train_expert_load.png",
                "plots/train_accuracy.png"):
        assert (root / rel).exists(), rel
    # The greedy val-accuracy probe (16 records at each of the smoke run's 2 checks), per domain,
    # against the training tokens seen so far.
    header, *val_rows = (root / "plots/train_val.csv").read_text().splitlines()
    assert header.split(",") == ["step", "tokens", "val_loss", "reference_val_loss", "accuracy", "accuracy_code",
                                 "accuracy_math", "accuracy_reasoning", "accuracy_writing", "reference_accuracy"]
    cells = [row.split(",") for row in val_rows]
    assert [int(c[0]) for c in cells] == [20, 40]
    assert 0 < int(cells[0][1]) < int(cells[1][1])
    assert all(0.0 <= float(x) <= 1.0 for c in cells for x in c[4:])
    probe = train_metrics["ternary"]["val_accuracy"]
    assert probe["records"] == 16 and probe["all"] == float(cells[-1][4])
    metrics = json.loads((root / "metrics/generate.json").read_text())
    assert metrics["splits"]["train"]["count"] > metrics["splits"]["test"]["count"] > 0
    assert set(metrics["splits"]["train"]["by_domain"]) == {"math", "code", "reasoning", "writing"}

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quillan"])
    parent = runs[runs["tags.mlflow.runName"] == "pipeline-smoke"]
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert set(children["tags.mlflow.runName"]) == {"generate", "gate_data", "calibrate", "gate_calibration",
                                                    "train", "gate_train", "grpo", "gate_grpo", "export",
                                                    "gate_export", "benchmark"}
    grpo = json.loads((root / "metrics/grpo.json").read_text())
    assert grpo["steps"] == 4 and set(grpo["before"]["by_domain"]) == {"math", "code", "reasoning", "writing"}
    assert grpo["before"]["count"] == grpo["after"]["count"] == 64
    for rel in ("models/grpo/model.safetensors", "models/grpo/tokenizer.json", "plots/grpo_reward.png",
                "plots/grpo_accuracy.png", "plots/grpo_curves.csv"):
        assert (root / rel).exists(), rel
    assert not (root / "models/grpo/checkpoints").exists()
    grpo_run = children[children["tags.mlflow.runName"] == "grpo"].iloc[0]
    assert grpo_run["metrics.grpo/reward_mean"] >= -1.0  # logged per step (NaN if missing)
    gen = children[children["tags.mlflow.runName"] == "generate"].iloc[0]
    assert gen["metrics.splits/train/count"] == metrics["splits"]["train"]["count"]
    assert len(gen["tags.mlflow.source.git.commit"]) == 40

    bench = json.loads((root / "metrics/benchmark.json").read_text())
    assert set(bench["variants"]) == {"unquantized", "reference", "ternary", "fp16", "int8", "int4", "mixed"}
    for row in bench["variants"].values():
        assert row["decode_tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0 and row["size_bytes"] > 0
        assert set(row["accuracy_by_domain"]) == {"math", "code", "reasoning", "writing"}
    assert bench["variants"]["ternary"]["size_bytes"] < bench["variants"]["int4"]["size_bytes"] \
        < bench["variants"]["fp16"]["size_bytes"] < bench["variants"]["unquantized"]["size_bytes"]
    assert bench["champion"] in {"ternary", "fp16", "int8", "int4", "mixed"}
    assert bench["registered"].startswith("quillan v1 @champion")
    assert "| ternary" in (root / "reports/benchmark.md").read_text()
    sample = run([sys.executable, "-m", "flows.cli", "sample", "models/export/ternary", "12+30=", "3+4="], root, env)
    assert sample.stdout.count("\n") == 2  # one completion per prompt

    # What follows changes the project: on a private copy, so the tests sharing clone A (and
    # their order) do not matter.
    root, env = copy_project(root, tmp_path / "quillan")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")

    # 2. Nothing changed: dvc repro runs nothing.
    again = run(dvc + ["repro"], root, env)
    assert "Running stage" not in again.stdout
    assert "didn't change" in again.stdout

    # 3. Forced through plain dvc repro: byte-identical outputs (deterministic stage).
    run(dvc + ["repro", "--force", "generate"], root, env)
    assert _outs(_lock(root), "generate") == _outs(lock, "generate")

    # 4. Bad data: the gate names every fault and dvc repro stops with a non-zero exit.
    path = root / "data/generated/train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows.append(dict(rows[0]))
    rows[1]["answer"] = ""
    rows[2]["answer"] = rows[2]["answer"] + "9"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    failed = run(dvc + ["repro", "--single-item", "gate_data"], root, env, check=False)
    assert failed.returncode != 0
    err = failed.stdout + failed.stderr
    assert "duplicate prompt" in err and "empty answer" in err and "answer fails its verifier" in err
    assert "train.jsonl:3 " in err  # the wrong answer, by line
    assert _lock(root)["gate_data"] == lock["gate_data"]  # the failed gate recorded nothing

    # 5. A variant that loses accuracy fails its gate and is never registered.
    from safetensors.torch import load_file, save_file

    int4 = root / "models/export/int4/model.safetensors"
    tensors = load_file(str(int4))
    tensors["embed.weight"] = tensors["embed.weight"] * 0  # every token looks the same: accuracy 0
    save_file(tensors, str(int4))
    from quillan.checkpoint import write_checksums

    write_checksums(int4.parent, ["model.safetensors", "metadata.json", "tokenizer.json"])  # consistent, simply bad
    redo = run([sys.executable, "-m", "flows.cli", "stage", "benchmark", "--set", "benchmark.max_accuracy_drop=0.0",
                "--set", "benchmark.primary_metric=size_bytes"], root, env)
    bench2 = json.loads((root / "metrics/benchmark.json").read_text())
    assert "int4" in bench2["gate_failed"] and "gate FAILED for int4" in redo.stdout
    assert bench2["champion"] != "int4" and "FAILED" in (root / "reports/benchmark.md").read_text()
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions("name='quillan'")
    assert {v.tags["variant"] for v in versions} <= {"ternary", "fp16", "int8", "mixed"}


def _ran(proc) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", proc.stdout + proc.stderr))


def test_experiments_rerun_exactly_what_a_param_feeds(smoke_runs, tmp_path):
    root, env = copy_project(smoke_runs["pristine"], tmp_path / "quillan")  # clone B as the run left it
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(git + ["add", "-A"], root, env)
    run(git + ["commit", "-qm", "smoke run"], root, env)

    # A grpo.* param: exactly grpo, export, benchmark and their gates run again.
    exp = run(DVC + ["exp", "run", "-n", "fewer-steps", "-S", "+grpo.steps=3"], root, env)
    assert _ran(exp) == {"grpo", "gate_grpo", "export", "gate_export", "benchmark"}
    diff = json.loads(run(DVC + ["metrics", "diff", "HEAD", "--json"], root, env).stdout)
    assert diff["metrics/grpo.json"]["steps"] == {"old": 4, "new": 3, "diff": -1}
    assert "fewer-steps" in run(DVC + ["exp", "show", "--json"], root, env).stdout
    run(DVC + ["plots", "diff", "HEAD", "-o", "plots_diff"], root, env)
    assert (root / "plots_diff/index.html").stat().st_size > 0
    assert not _ran(run(DVC + ["repro"], root, env))  # nothing changed since: nothing runs

    # A data.* param changes generate, and every other stage depends on generate's outputs.
    edges = re.findall(r'"(\w+)" -> "(\w+)"', run(DVC + ["dag", "--dot"], root, env).stdout)
    reached, frontier = set(), {"generate"}
    while frontier:
        reached |= frontier
        frontier = {dst for src, dst in edges if src in frontier} - reached
    assert reached == set(_lock(root))
    params = root / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("data: {}", "data: {n_per_domain: 200}"))
    status = json.loads(run(DVC + ["status", "--json"], root, env).stdout)
    assert "generate" in status  # so `dvc repro` re-runs it, and then everything it reaches
    params.write_text(original)


def test_failing_gate_fails_the_flow_and_nothing_after_it_runs(smoke_runs, tmp_path):
    root, env = copy_project(smoke_runs["pristine"], tmp_path / "quillan")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = len(client.search_model_versions("name='quillan'"))
    suite = root / "gates/data.json"
    spec = json.loads(suite.read_text())
    spec["expectations"][0]["kwargs"]["min_value"] = 10**6  # a team now demands a million rows
    spec["expectations"][0]["meta"]["why"] = "fewer than 1000000 rows"
    suite.write_text(json.dumps(spec, indent=1))
    lock = _lock(root)
    flow = run([sys.executable, "-m", "flows.cli", "run"], root, env, check=False)
    assert flow.returncode == 1
    err = flow.stderr
    assert "pipeline failed: stage 'gate_data' failed" in err and "fewer than 1000000 rows" in err
    assert _ran(flow) == {"gate_data"}  # calibrate and everything after never started
    assert _lock(root) == lock
    assert len(client.search_model_versions("name='quillan'")) == versions


def test_config_error_stops_before_any_stage(project):
    root, env = project
    (root / "params.yaml").write_text("preset: smoke\ndata:\n  n_per_domain: -5\n")
    proc = run([sys.executable, "-m", "flows.cli", "run"], root, env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "config error: params.yaml: data.n_per_domain: Input should be greater than or equal to 3 (got -5)"
    assert not (root / "data/generated").exists() and not (root / "dvc.lock").exists()
