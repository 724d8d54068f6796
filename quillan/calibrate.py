"""Calibration: activation and weight statistics per layer, and the per-module precision plan.

The plan says which modules stay in full precision (embeddings, norms, output head, routers —
seed note 002 "layer-wise precision preservation", seed note 000 "overseer FP16") and which go
ternary (every BitLinear). The export stage reads the same plan and the activation scales.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quillan.bitnet import BitLinear, ternary_quantize
from quillan.model import RMSNorm
from quillan.moe import CouncilFFN

# Seed note 002, "Size-adaptive compression": (upper bound on parameters, sparsity threshold).
SPARSITY_TABLE = ((50_000_000, 0.05), (500_000_000, 0.10), (2_000_000_000, 0.15), (math.inf, 0.20))


class CalibrateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sample_size: int = Field(256, ge=1, description="calibration records, stratified by domain × difficulty")
    batch_size: int = Field(32, ge=1)
    percentiles: list[float] = Field(default_factory=lambda: [50.0, 99.0, 99.9],
                                     description="percentiles of |activation| per layer input")
    checkpoint: str | None = Field(None, description="model directory to calibrate (default: the fresh init train starts from)")


def sparsity_threshold(n_params: int) -> float:
    """Size-adaptive sparsity threshold by parameter count (seed note 002's table)."""
    return next(t for bound, t in SPARSITY_TABLE if n_params < bound)


def module_precision(module: nn.Module) -> str | None:
    """'ternary' for BitLinear, 'fp16' for other modules that own parameters, None otherwise."""
    if isinstance(module, BitLinear):
        return "ternary" if module.quantize else "fp16"
    if any(True for _ in module.parameters(recurse=False)):
        return "fp16"
    return None


def precision_plan(model: nn.Module) -> dict[str, str]:
    """{module name: precision} for every module that owns parameters (the head shares the
    embedding when tied; it is listed under both names)."""
    plan = {}
    for name, module in model.named_modules():
        p = module_precision(module)
        if p is not None:
            plan[name] = p
    return plan


def _module_kind(m: nn.Module) -> str:
    if isinstance(m, CouncilFFN):
        return "micro_agents"
    if isinstance(m, RMSNorm):
        return "norm"
    return type(m).__name__


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                  percentiles: list[float], max_samples: int = 200_000) -> dict[str, dict[str, Any]]:
    """Per parameterised module: input-activation absmax and |x| percentiles (over the
    calibration tokens, padding excluded), weight absmean, the share of weights absmean
    rounding zeroes, and the layer's precision.

    Rows run cut to their real tokens, those of one length together: inside the council layers
    tokens are flattened and routed to experts in subsets, where a padding mask no longer lines
    up with the rows, so padding is kept out of every module's inputs by never feeding it."""
    acts: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks, plan = [], precision_plan(model)

    def hook(name):
        def fn(mod, inputs, output):
            x = inputs[0]
            if torch.is_floating_point(x):
                acts[name].append(x.detach().abs().reshape(-1).float())
        return fn

    for name, m in model.named_modules():
        if name in plan and isinstance(m, (nn.Linear, RMSNorm)):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            rows = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
            for n in sorted({len(r) for r in rows}):  # rows of one length run together, unpadded
                same = torch.stack([r for r in rows if len(r) == n])
                model(same, torch.ones_like(same))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    stats: dict[str, dict[str, Any]] = {}
    modules = dict(model.named_modules())
    for name, precision in plan.items():
        m = modules[name]
        entry: dict[str, Any] = {"kind": _module_kind(m), "precision": precision,
                                 "parameters": sum(p.numel() for p in m.parameters(recurse=False))}
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            absmean = float(weight.abs().mean())
            q, _ = ternary_quantize(weight)
            entry.update(weight_absmean=absmean, weight_absmax=float(weight.abs().max()),
                         zero_share=float((q == 0).float().mean()))
        if acts.get(name):
            a = torch.cat(acts[name])
            if a.numel() > max_samples:  # torch.quantile's input limit; a fixed stride keeps it deterministic
                a = a[:: math.ceil(a.numel() / max_samples)]
            entry["act_absmax"] = float(a.max())
            for pct in percentiles:
                entry[f"act_p{pct:g}"] = float(torch.quantile(a, pct / 100.0))
            entry["act_scale"] = entry["act_absmax"] / 127.0  # static INT8 scale for export
        stats[name] = entry
    return stats
