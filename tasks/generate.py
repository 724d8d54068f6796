"""Stage `generate`: self-generated verifiable tasks, quality filters, splits, tokenizer.

Outputs: data/generated/{train,val,test}.jsonl, data/tokenizer.json, metrics/generate.json,
plots/generate_lengths.png.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quillan.data import SPLITS, build_dataset
from tasks.common import PLOTS_DIR, ROOT, atomic_path, write_jsonl, write_metrics
from tasks.params import Params
from tasks.plots import save_histograms
from tasks.tracking import stage_run

DATA_DIR = ROOT / "data" / "generated"
TOKENIZER = ROOT / "data" / "tokenizer.json"


def summarize(splits: dict[str, list[dict]], report: dict) -> dict:
    """metrics/generate.json: counts per split, domain and difficulty, and filter drops."""
    metrics: dict = {"filters": report, "splits": {}}
    for name, rows in splits.items():
        metrics["splits"][name] = {
            "count": len(rows),
            "by_domain": dict(sorted(Counter(r["domain"] for r in rows).items())),
            "by_difficulty": {str(k): v for k, v in sorted(Counter(r["difficulty"] for r in rows).items())},
            "mean_tokens": round(sum(r["n_tokens"] for r in rows) / max(1, len(rows)), 3),
        }
    return metrics


def run(params: Params) -> dict:
    cfg = params.data
    complete = None
    if cfg.self_generate.checkpoint:
        from tasks.selfgen import completer_from_checkpoint

        complete = completer_from_checkpoint(Path(cfg.self_generate.checkpoint), cfg.self_generate, params.seed)
    with stage_run("generate", {"seed": params.seed, "preset": params.preset, "data": cfg.model_dump()}) as tracker:
        ds = build_dataset(cfg, params.seed, complete)
        with atomic_path(DATA_DIR) as tmp:
            tmp.mkdir()
            for name in SPLITS:
                write_jsonl(tmp / f"{name}.jsonl", ds.splits[name])
        with atomic_path(TOKENIZER) as tmp:
            ds.tokenizer.save(str(tmp), pretty=True)
        metrics = summarize(ds.splits, ds.report.as_dict())
        metrics_path = write_metrics("generate", metrics)
        plot = save_histograms(PLOTS_DIR / "generate_lengths.png",
                               {s: [r["n_tokens"] for r in ds.splits[s]] for s in SPLITS},
                               "prompt + target length", "tokens")
        tracker.log_metrics(metrics)
        tracker.log_artifact(metrics_path)
        tracker.log_artifact(plot, "plots")
        tracker.log_artifact(TOKENIZER)
    kept = {s: len(ds.splits[s]) for s in SPLITS}
    print(f"generate: kept {kept}, dropped {dict(ds.report.dropped)}")
    return metrics
