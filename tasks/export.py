"""Stage `export`: packed ternary, dequantized FP16, bitsandbytes INT8/INT4 and mixed exports of
models/grpo, each with a metadata.json of sizes, bits per weight and dequantization error.

Outputs: models/export/<variant>/ (model.safetensors, metadata.json, tokenizer.json),
metrics/export.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from quillan.bitnet import bit_linears, ternary_quantize
from quillan.checkpoint import load_model_dir
from quillan.export import BANKS, KERNELS, convert, dequantized_weight, save
from quillan.model import Quillan
from quillan.train.data import TokenizedRecords, collate, masked_ce
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


def layer_stats(source: Quillan, exported: Quillan, plan: dict[str, str]) -> dict[str, float]:
    """Weights in quantized layers, their ternary zero share, and the dequantization error: the
    relative Frobenius error of what the export computes with against the source's ternary
    weights scale·q (what the trained model computes with) and against its latent float weights.
    Micro-agent banks have no ternary form: both errors use the float bank."""
    n = zeros = 0
    err_t = err_l = norm_t = norm_l = 0.0
    for name in plan:
        parent, _, leaf = name.rpartition(".")
        if leaf in BANKS:
            latent = ternary = getattr(source.get_submodule(parent), leaf).detach().float()
        else:
            src = source.get_submodule(name)
            latent, ternary = src.weight.detach().float(), src.ternary_weight().detach().float()
            zeros += int((ternary_quantize(latent, src.per_channel)[0] == 0).sum())
        w = dequantized_weight(exported.get_submodule(name))
        n += latent.numel()
        err_t += float((w - ternary).pow(2).sum())
        norm_t += float(ternary.pow(2).sum())
        err_l += float((w - latent).pow(2).sum())
        norm_l += float(latent.pow(2).sum())
    return {"quantized_weights": n, "weight_sparsity": zeros / max(n, 1),
            "dequant_error_vs_ternary": (err_t / max(norm_t, 1e-30)) ** 0.5,
            "dequant_error_vs_latent": (err_l / max(norm_l, 1e-30)) ** 0.5}


def size_stats(directory: Path, tensors_bytes_quant: int, quant_weights: int, n_params: int) -> dict[str, float]:
    on_disk = (directory / "model.safetensors").stat().st_size
    return {"parameters": n_params, "bytes_on_disk": on_disk,
            "bits_per_weight_quantized": 8 * tensors_bytes_quant / max(quant_weights, 1),
            "bits_per_weight_overall": 8 * on_disk / n_params,
            "compression_vs_fp32": 4 * n_params / on_disk, "compression_vs_fp16": 2 * n_params / on_disk}


def check_trainable(model: Quillan, tokenizer: Tokenizer, records: list[dict]) -> dict[str, int]:
    """Backward through the dequantized FP16 copy: every linear weight must get a non-zero gradient
    somewhere (experts no token chose excepted: checked over a batch that reaches them all)."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    data = TokenizedRecords(records[:64], tokenizer, model.cfg.max_seq_len)
    batch = collate([data[i] for i in range(len(data))], data.pad_id)
    out = model(batch["input_ids"], batch["attention_mask"])
    masked_ce(out.logits, batch["labels"]).backward()
    linears = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    with_grad = [n for n, p in linears if p.grad is not None and bool((p.grad != 0).any())]
    if not with_grad:
        raise ValueError("fp16 export: no gradient reached any weight")
    return {"weights": len(linears), "weights_with_gradient": len(with_grad)}


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
            stats = layer_stats(source, model, plan)
            quant_bytes = sum(t.numel() * t.element_size() for t in _plan_tensors(model, plan))
            extra = {"source": "models/grpo", "kernels": {p: KERNELS[p] for p in sorted(set(plan.values()))},
                     "act_quant": source.cfg.act_quant, **stats}
            if variant == "fp16":
                extra["trainable_check"] = check_trainable(model, tokenizer, val)
            meta = save(model, tmp / variant, variant, plan, extra, tokenizer)
            meta.update(size_stats(tmp / variant, quant_bytes, stats["quantized_weights"], n_params))
            (tmp / variant / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
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


def _plan_tensors(model: nn.Module, plan: dict[str, str]) -> list[torch.Tensor]:
    """The stored tensors of the quantized layers (what their bits per weight count)."""
    from quillan.export import export_tensors

    prefixes = tuple(f"{n}." for n in plan)
    return [t for k, t in export_tensors(model).items() if k.startswith(prefixes)]
