"""What an export's metadata.json reports beside its format: weights in the quantized layers and
their dequantization error against the source, bytes and bits per weight, and the FP16 copy's
trainability check."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from quillan.bitnet import ternary_quantize
from quillan.export.convert import dequantized_weight
from quillan.export.plan import BANKS, HEAD
from quillan.model import Quillan
from quillan.train.data import TokenizedRecords, collate, masked_ce


def layer_stats(source: Quillan, exported: Quillan, plan: dict[str, str]) -> dict[str, float]:
    """Weights in quantized layers, their ternary zero share, and the dequantization error: the
    relative Frobenius error of what the export computes with against the source's ternary
    weights scale·q (what the trained model computes with) and against its latent float weights.
    Micro-agent banks and the output head have no ternary form: both errors use the float weight,
    and the zero share counts ternary layers only."""
    n = n_ternary = zeros = 0
    err_t = err_l = norm_t = norm_l = 0.0
    for name in plan:
        parent, _, leaf = name.rpartition(".")
        if leaf in BANKS:
            latent = ternary = getattr(source.get_submodule(parent), leaf).detach().float()
        elif name == HEAD:
            latent = ternary = source.head.weight.detach().float()
        else:
            src = source.get_submodule(name)
            latent, ternary = src.weight.detach().float(), src.ternary_weight().detach().float()
            zeros += int((ternary_quantize(latent, src.per_channel)[0] == 0).sum())
            n_ternary += latent.numel()
        w = dequantized_weight(exported.get_submodule(name))
        n += latent.numel()
        err_t += float((w - ternary).pow(2).sum())
        norm_t += float(ternary.pow(2).sum())
        err_l += float((w - latent).pow(2).sum())
        norm_l += float(latent.pow(2).sum())
    return {"quantized_weights": n, "weight_sparsity": zeros / max(n_ternary, 1),
            "dequant_error_vs_ternary": (err_t / max(norm_t, 1e-30)) ** 0.5,
            "dequant_error_vs_latent": (err_l / max(norm_l, 1e-30)) ** 0.5}


def size_stats(weights_file: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]],
               n_params: int) -> dict[str, float]:
    """Bytes on disk and bits per weight. `tensors` are the stored tensors (keys as in the file),
    `shapes` the quantized modules' weight shapes: bits per quantized weight count the bytes of
    those modules' stored tensors (codes, scales, quant-state) over their weights; bits per weight
    overall the whole file over the float model's `n_params` parameters."""
    prefixes = tuple(f"{name}." for name in shapes)
    quant_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefixes))
    quant_weights = sum(math.prod(s) for s in shapes.values())
    on_disk = Path(weights_file).stat().st_size
    return {"parameters": n_params, "bytes_on_disk": on_disk,
            "bits_per_weight_quantized": 8 * quant_bytes / max(quant_weights, 1),
            "bits_per_weight_overall": 8 * on_disk / n_params,
            "compression_vs_fp32": 4 * n_params / on_disk, "compression_vs_fp16": 2 * n_params / on_disk}


def check_trainable(model: Quillan, tokenizer: Tokenizer, records: list[dict]) -> dict[str, int]:
    """Backward through a float copy of `model` (the FP16 export): every linear weight must get a
    non-zero gradient somewhere (experts no token chose excepted: checked over 64 records, a batch
    that reaches them all). ValueError if no weight gets one."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    data = TokenizedRecords(records[:64], tokenizer, model.cfg.max_seq_len, digit_order=model.cfg.digit_order)
    batch = collate([data[i] for i in range(len(data))], data.pad_id)
    out = model(batch["input_ids"], batch["attention_mask"])
    masked_ce(out.logits, batch["labels"]).backward()
    linears = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    with_grad = [n for n, p in linears if p.grad is not None and bool((p.grad != 0).any())]
    if not with_grad:
        raise ValueError("fp16 export: no gradient reached any weight")
    return {"weights": len(linears), "weights_with_gradient": len(with_grad)}
