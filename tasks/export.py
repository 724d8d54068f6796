"""Stage `export`: packed ternary, dequantized FP16, bitsandbytes INT8/INT4 and mixed exports of
models/grpo, each with a metadata.json of sizes, bits per weight and dequantization error.

Outputs: models/export/<variant>/ (model.safetensors, metadata.json, tokenizer.json),
metrics/export.json. What metadata.json reports is computed by the library (quillan.export.save,
quillan.export.stats).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from quillan import kernels
from quillan.bitnet import bit_linears
from quillan.checkpoint import load_model_dir
from quillan.export import KERNELS, convert, save
from quillan.export.stats import check_trainable, layer_stats
from quillan.model import Quillan
from tasks.common import ROOT, atomic_path, read_jsonl, write_metrics
from tasks.params import Params
from tasks.tracking import stage_run

SOURCE = ROOT / "models" / "grpo"
CALIBRATION = ROOT / "models" / "calibration.json"
OUT_DIR = ROOT / "models" / "export"


def check_plan(model: Quillan, calibration: Path) -> None:
    """The calibration plan and the model must agree on which modules are ternary."""
    try:
        plan = json.loads(calibration.read_text())["plan"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{calibration}: no precision plan ({e})") from None
    ternary = {n for n, p in plan.items() if p == "ternary"}
    layers = {n for n, m in model.named_modules() if m in set(bit_linears(model)) and m.quantize}
    if ternary != layers:
        diff = sorted(ternary ^ layers)[:5]
        raise ValueError(f"{calibration}: plan does not match {SOURCE}: ternary modules differ at {diff}")


def run(params: Params) -> dict:
    cfg = params.export
    source, tokenizer = load_model_dir(SOURCE)
    check_plan(source, CALIBRATION)
    val = read_jsonl(ROOT / "data" / "generated" / "val.jsonl")
    n_params = source.num_parameters()
    summary: dict[str, dict] = {}
    with stage_run("export", {"export": cfg.model_dump()}) as tracker, atomic_path(OUT_DIR) as tmp:
        tmp.mkdir()
        for variant in cfg.variants:
            model, plan = convert(copy.deepcopy(source), variant, cfg)
            extra = {"source": "models/grpo", "kernels": {p: KERNELS[p] for p in sorted(set(plan.values()))},
                     "act_quant": source.cfg.act_quant, **layer_stats(source, model, plan)}
            if "ternary" in plan.values():  # the instruction path of the machine that exported (and measured) it
                extra["ternary_kernel_path"] = kernels.path() or f"none ({kernels.unavailable_reason()})"
            if variant == "fp16":
                extra["trainable_check"] = check_trainable(model, tokenizer, val)
            meta = save(model, tmp / variant, variant, plan, extra, tokenizer)
            summary[variant] = {k: meta[k] for k in ("bytes_on_disk", "bits_per_weight_quantized",
                                                     "bits_per_weight_overall", "compression_vs_fp32",
                                                     "compression_vs_fp16", "weight_sparsity",
                                                     "dequant_error_vs_ternary", "dequant_error_vs_latent")}
            print(f"export: {variant:8s} {meta['bytes_on_disk'] / 1024:8.1f} KiB, "
                  f"{meta['bits_per_weight_quantized']:.2f} bits/weight in quantized layers, "
                  f"error vs ternary {meta['dequant_error_vs_ternary']:.2e}")
        metrics = {"parameters": n_params, "variants": summary}
        path = write_metrics("export", metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(path)
    return metrics

