"""Stage `benchmark`: quality, size and CPU speed of every export, of the unquantized model and of
the full-precision reference; quality gates; the champion registered in MLflow as `quillan`.

Outputs: metrics/benchmark.json, reports/benchmark.md, plots/benchmark_accuracy_bits.png,
plots/benchmark_speed_size.png.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from quillan.data.splits import stratified_sample
from quillan.checkpoint import load_any, load_model_dir
from quillan.export.measure import (champion_rule, decode_tokens_per_s, gate_failures, pick_champion,
                                    prefill_tokens_per_s)
from quillan.export.memory import peak_rss_all, size_and_bits
from quillan.inference import accuracy_by_domain, prior_baseline
from quillan.machine import cpu_info
from quillan.train.data import TokenizedRecords
from quillan.train.evaluate import evaluate_loss
from tasks.common import PLOTS_DIR, REPORTS_DIR, ROOT, read_jsonl, write_metrics, write_text
from tasks.params import Params
from tasks.tracking import stage_run

EXPORTS = ROOT / "models" / "export"
UNQUANTIZED = ROOT / "models" / "grpo"
REFERENCE = ROOT / "models" / "train" / "reference"
DATA = ROOT / "data" / "generated"
REPORT = REPORTS_DIR / "benchmark.md"
MODEL_NAME = "quillan"


def candidates() -> dict[str, Path]:
    """Every model to measure: unquantized (models/grpo), reference (if trained), each export."""
    out = {"unquantized": UNQUANTIZED}
    if (REFERENCE / "model.safetensors").exists():
        out["reference"] = REFERENCE
    if not EXPORTS.is_dir():
        raise FileNotFoundError(f"{EXPORTS}: no exports (run the export stage first)")
    for d in sorted(EXPORTS.iterdir()):
        if (d / "metadata.json").exists():
            out[d.name] = d
    return out


def measure(name: str, path: Path, cfg, test: list[dict], ppl_sets: dict[str, TokenizedRecords],
            rss: dict[str, int]) -> tuple[dict, list[int]]:
    """The variant's metrics row, and its 0/1 outcome on each of `test` (pairs variants record by record)."""
    model, tokenizer = load_any(path)
    model.eval()
    with tqdm(total=len(test), desc=f"benchmark: {name}", unit="rec", mininterval=5) as bar:
        acc = accuracy_by_domain(model, tokenizer, test, cfg.eval_max_new_tokens, progress=bar.update)
    size, bits = size_and_bits(path, model)
    row = {"accuracy": acc["accuracy"], "accuracy_interval95": acc["interval95"], "accuracy_by_domain": acc["by_domain"],
           "accuracy_by_task": acc["by_task"], "accuracy_by_difficulty": acc["by_difficulty"],
           "task_counts": acc["task_counts"], "size_bytes": size, "bits_per_weight": bits, **rss}
    for split, data in ppl_sets.items():
        row[f"{split}_perplexity"] = evaluate_loss(model, data)["perplexity"]
    row["prefill_tokens_per_s"] = prefill_tokens_per_s(model, cfg.prefill_batch, cfg.prefill_len, cfg.repeats)
    row["decode_tokens_per_s"] = decode_tokens_per_s(model, cfg.decode_tokens, cfg.repeats)
    return row, acc["outcomes"]


def markdown(rows: dict[str, dict], failed: dict[str, float], champion: str | None, threads: int,
             machine: dict | None = None, rule: str = "") -> str:
    where = ""
    if machine:
        isa = ", ".join(f for f, on in machine["isa"].items() if on) or "no listed ISA extensions"
        where = f" on {machine['cpu']} ({isa})"
    lines = [f"## Benchmark ({threads} threads{where})", "",
             "| variant | accuracy | val ppl | test ppl | size | bits/weight | peak RSS | prefill tok/s | decode tok/s | gate |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for v, r in rows.items():
        gate = (f"FAILED (−{failed[v] * 100:.1f} points)" if v in failed else
                {"unquantized": "baseline", "reference": "not gated (not an export)"}.get(v, "passed"))
        lines.append(f"| {v}{' 🏆' if v == champion else ''} | {r['accuracy']:.4f} | {r['val_perplexity']:.3f} | "
                     f"{r['test_perplexity']:.3f} | {r['size_bytes'] / 1024:,.1f} KiB | {r['bits_per_weight']:.2f} | "
                     f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB | {r['prefill_tokens_per_s']:,.0f} | "
                     f"{r['decode_tokens_per_s']:,.1f} | {gate} |")
    lines += ["", f"Champion: **{champion or 'none (no variant passed its gate)'}**" + (f" ({rule})" if rule else "")]
    return "\n".join(lines) + "\n"


def by_task(rows: dict[str, dict], prior: dict[str, float], champion: str | None) -> dict[str, dict]:
    """{family: {"count", "prior", "unquantized", "champion"}}: each family's accuracy beside what
    always giving its most frequent training answer scores."""
    shown = [v for v in ("unquantized", champion) if v in rows]
    counts = rows["unquantized"]["task_counts"]
    return {t: {"count": counts[t], "prior": prior.get(t, 0.0),
                **{("champion" if v == champion else v): rows[v]["accuracy_by_task"][t] for v in shown}}
            for t in sorted(counts)}


def task_table(table: dict[str, dict], rows: dict[str, dict], champion: str | None) -> str:
    """Markdown: accuracy per task family and per difficulty next to the prior baseline."""
    name = champion or "unquantized"
    key = "champion" if champion else "unquantized"
    r = rows[name]
    lo, hi = r["accuracy_interval95"]
    lines = ["", f"### Per task family ({name}; prior = always the family's most frequent training answer)", "",
             f"Overall {r['accuracy']:.3f} (95 % interval {lo:.3f}–{hi:.3f}, n = {sum(t['count'] for t in table.values())}).",
             "", "| family | n | accuracy | prior |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {t} | {v['count']} | {v[key]:.3f} | {v['prior']:.3f} |" for t, v in table.items()]
    lines += ["", "| difficulty | accuracy |", "| --- | ---: |"]
    lines += [f"| {d} | {a:.3f} |" for d, a in r["accuracy_by_difficulty"].items()]
    return "\n".join(lines) + "\n"


def _plots(rows: dict[str, dict]) -> list[Path]:
    from tasks.plots import save_scatter

    PLOTS_DIR.mkdir(exist_ok=True)
    return [save_scatter(PLOTS_DIR / "benchmark_accuracy_bits.png",
                         {v: (r["bits_per_weight"], r["accuracy"]) for v, r in rows.items()},
                         "accuracy against bits per weight", "bits per weight (overall, on disk)", "test accuracy"),
            save_scatter(PLOTS_DIR / "benchmark_speed_size.png",
                         {v: (r["size_bytes"] / 1024, r["decode_tokens_per_s"]) for v, r in rows.items()},
                         "decode speed against size", "size on disk (KiB)", "batch-1 decode tokens/s")]


# The pyfunc's inference-time params (`predict(..., params=...)`, REST `{"params": {...}}`) and
# their defaults; in the logged signature, so MLflow's server accepts them.
PREDICT_PARAMS = {"max_new_tokens": 48, "temperature": 0.0}


def register(tracker, champion: str, path: Path, value: float, metric: str) -> str:
    """Log the champion as a pyfunc model (models from code: no pickle) and register it; it takes
    the alias `champion` if it beats the current champion on `metric`, else `challenger`."""
    import mlflow
    from mlflow.models import infer_signature

    example = ["12+30="]
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(ROOT / "tasks" / "pyfunc_model.py"), artifacts={"export": str(path)},
        signature=infer_signature(example, ["42"], params=PREDICT_PARAMS), input_example=example, registered_model_name=MODEL_NAME,
        pip_requirements=["torch==2.13.0", "tokenizers", "safetensors", "bitsandbytes"],
        code_paths=[str(ROOT / "quillan")])
    client = mlflow.MlflowClient()
    version = info.registered_model_version
    client.set_model_version_tag(MODEL_NAME, version, "variant", champion)
    client.set_model_version_tag(MODEL_NAME, version, f"primary.{metric}", str(value))
    better = metric != "size_bytes"
    try:
        current = client.get_model_version_by_alias(MODEL_NAME, "champion")
        old = float(current.tags.get(f"primary.{metric}", "nan"))
        wins = old != old or (value > old if better else value < old)
    except mlflow.exceptions.MlflowException:
        wins = True
    alias = "champion" if wins else "challenger"
    client.set_registered_model_alias(MODEL_NAME, alias, version)
    return f"{MODEL_NAME} v{version} @{alias}"


def run(params: Params) -> dict:
    cfg = params.benchmark
    paths = candidates()
    test_all = read_jsonl(DATA / "test.jsonl")
    test = stratified_sample(test_all, cfg.eval_size, params.seed) if cfg.eval_size else test_all
    base_model, tokenizer = load_model_dir(UNQUANTIZED)
    ppl_sets = {}
    for split in ("val", "test"):
        recs = read_jsonl(DATA / f"{split}.jsonl")
        recs = stratified_sample(recs, cfg.ppl_size, params.seed) if cfg.ppl_size else recs
        ppl_sets[split] = TokenizedRecords(recs, tokenizer, base_model.cfg.max_seq_len,
                                            digit_order=base_model.cfg.digit_order)
    threads = torch.get_num_threads()
    # Speeds differ between CPUs of one machine type (bitsandbytes' INT4 kernel needs AVX512-BF16,
    # torch._int_mm AVX512-VNNI): the CPU and its ISA flags travel with the numbers.
    machine = cpu_info()
    with stage_run("benchmark", {"benchmark": cfg.model_dump(), "threads": threads, "cpu": machine["cpu"],
                                 **{f"isa.{k}": v for k, v in machine["isa"].items()}}) as tracker:
        # Memory probes first and apart from the timed loops, so they never compete for the cores.
        rss = peak_rss_all(paths)
        measured = {name: measure(name, path, cfg, test, ppl_sets, rss[name]) for name, path in paths.items()}
        rows = {name: row for name, (row, _) in measured.items()}
        failed = gate_failures({v: r["accuracy"] for v, r in rows.items() if v != "reference"}, "unquantized",
                               cfg.max_accuracy_drop)
        passing = [v for v in rows if v not in ("unquantized", "reference") and v not in failed]
        champion = pick_champion(rows, passing, cfg.primary_metric,
                                 {name: outcomes for name, (_, outcomes) in measured.items()}, cfg.champion_tolerance_se)
        prior = prior_baseline(read_jsonl(DATA / "train.jsonl"), test)
        metrics = {"variants": rows, "champion": champion, "gate_failed": failed, "threads": threads,
                   "machine": machine, "prior_baseline": prior["overall"],
                   "accuracy_by_task": by_task(rows, prior, champion),
                   "eval_records": len(test)}
        for v, drop in failed.items():
            print(f"benchmark: gate FAILED for {v}: accuracy {rows[v]['accuracy']:.4f} is {drop * 100:.1f} points below "
                  f"the unquantized model (max_accuracy_drop {cfg.max_accuracy_drop * 100:.0f} points); not registered")
        if champion and cfg.register_model:
            metrics["registered"] = register(tracker, champion, paths[champion], rows[champion][cfg.primary_metric],
                                             cfg.primary_metric)
        path = write_metrics("benchmark", metrics)
        rule = champion_rule(cfg.primary_metric, cfg.champion_tolerance_se)
        md = markdown(rows, failed, champion, threads, machine, rule) + task_table(metrics["accuracy_by_task"], rows, champion)
        write_text(REPORT, md)
        for p in _plots(rows):
            tracker.log_artifact(p, "plots")
        tracker.log_metrics({"variants": rows})
        tracker.log_artifact(path)
        tracker.log_artifact(REPORT)
    print(md)
    return metrics

