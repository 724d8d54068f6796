"""Stage `calibrate`: per-layer activation/weight statistics and the per-module precision plan.

Outputs: models/calibration.json, metrics/calibrate.json.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from quillan.calibrate import collect_stats, precision_plan, sparsity_threshold
from quillan.data.splits import stratified_sample
from quillan.checkpoint import load_model_dir
from quillan.model import Quillan
from quillan.train.data import TokenizedRecords, collate
from tasks.common import ROOT, read_jsonl, write_json, write_metrics
from tasks.params import Params
from tasks.tracking import stage_run

OUTPUT = ROOT / "models" / "calibration.json"


def initial_model(params: Params, tokenizer: Tokenizer, checkpoint: str | None) -> Quillan:
    """The model training starts from: a checkpoint directory, or the seeded fresh init."""
    if checkpoint:
        model, _ = load_model_dir(Path(checkpoint))
        return model
    torch.manual_seed(params.seed)
    return Quillan(params.quillan_config(tokenizer))


def run(params: Params) -> dict:
    cfg = params.calibrate
    tokenizer = Tokenizer.from_file(str(ROOT / "data" / "tokenizer.json"))
    records = read_jsonl(ROOT / "data" / "generated" / "train.jsonl")
    with stage_run("calibrate", {"seed": params.seed, "calibrate": cfg.model_dump(),
                                 "model": params.model.model_dump()}) as tracker:
        model = initial_model(params, tokenizer, cfg.checkpoint or params.train.init_checkpoint)
        sample = stratified_sample(records, cfg.sample_size, params.seed)
        data = TokenizedRecords(sample, tokenizer, model.cfg.max_seq_len, digit_order=model.cfg.digit_order)
        batches = (collate([data[i] for i in range(s, min(s + cfg.batch_size, len(data)))], data.pad_id)
                   for s in range(0, len(data), cfg.batch_size))
        layers = collect_stats(model, batches, cfg.percentiles)
        n_params = model.num_parameters()
        plan = precision_plan(model)
        report = {
            "model_parameters": n_params,
            "sample_size": len(sample),
            "sparsity_threshold": sparsity_threshold(n_params),
            "modules": sorted(plan),
            "plan": plan,
            "layers": layers,
        }
        write_json(OUTPUT, report)
        ternary = [v for v in layers.values() if v["precision"] == "ternary"]
        metrics = {
            "layers": len(layers),
            "ternary_layers": len(ternary),
            "fp16_layers": len(layers) - len(ternary),
            "sample_size": len(sample),
            "sparsity_threshold": report["sparsity_threshold"],
            "mean_zero_share": sum(v["zero_share"] for v in ternary) / max(1, len(ternary)),
            "max_act_absmax": max((v.get("act_absmax", 0.0) for v in layers.values()), default=0.0),
        }
        path = write_metrics("calibrate", metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(path)
        tracker.log_artifact(OUTPUT)
    print(f"calibrate: {metrics['layers']} layers ({metrics['ternary_layers']} ternary), "
          f"threshold {metrics['sparsity_threshold']}, mean zero share {metrics['mean_zero_share']:.3f}")
    return metrics
