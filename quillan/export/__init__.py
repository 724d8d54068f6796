"""Exports of a trained Quillan model: packed ternary, dequantized FP16, bitsandbytes INT8/INT4,
and a per-module mixed plan. Each is a directory `model.safetensors` + `metadata.json`
(+ `tokenizer.json`), reloadable by `quillan.export.load(path)` alone. No pickles.

Every variant encodes the same trained network: the deployable ternary weights scale·q of each
BitLinear (never the latent training weights), in the format the variant names. Modules the
precision plan keeps in full precision (embeddings, norms, routers) are stored in FP16 and
computed in float32 on load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from quillan.bitnet import BitLinear, binary_quantize
from quillan.checkpoint import CheckpointError, file_sha256, read_json_file
from quillan.config import QuillanConfig
from quillan.export.bnb_layers import (Int4Linear, bitsandbytes, int8_dequantized, int8_from_export, int8_linear,
                                      int8_tensors, with_bias)
from quillan.export.layers import GroupedTernarySwiGLU, Int8Rows, TernaryLinear
from quillan.model import Quillan, rope_tables
from quillan.moe import CouncilFFN

Variant = Literal["ternary", "fp16", "int8", "int4", "mixed"]
VARIANTS = get_args(Variant)
Kind = Literal["attention", "experts", "micro_agents", "overseer", "dense_ffn", "diffusion"]
KINDS = get_args(Kind)
Precision = Literal["ternary", "fp16", "int8", "int4"]
WEIGHTS, METADATA, TOKENIZER = "model.safetensors", "metadata.json", "tokenizer.json"
BANKS = ("micro_keys", "micro_down", "micro_up")


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variants: list[Variant] = Field(
        default_factory=lambda: list(VARIANTS), min_length=1, description="exports to write")
    int4_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type")
    int8_threshold: float = Field(0.0, ge=0, description="LLM.int8() outlier threshold (0: all columns int8)")
    mixed: dict[Kind, Precision] = Field(
        default_factory=lambda: {"overseer": "fp16", "diffusion": "ternary", "experts": "int4",
                                 "micro_agents": "int8", "attention": "ternary", "dense_ffn": "ternary"},
        description="precision per module kind of the `mixed` variant (seed note 000)")


def module_kind(name: str) -> str | None:
    """Kind of a module by its name in Quillan, or None for embeddings, norms and the head."""
    parts = name.split(".")
    if parts[0] == "diffusion":
        return "diffusion"
    if parts[0] != "blocks" or len(parts) < 3:
        return None
    if parts[2] == "attn":
        return "attention"
    if parts[2] == "ffn":
        sub = parts[3] if len(parts) > 3 else ""
        if sub == "experts":
            return "experts"
        if sub in ("overseer", "routers"):
            return "overseer"
        if sub == "" or sub.startswith("micro"):  # the council module itself holds the banks
            return "micro_agents"
        return "dense_ffn"
    return None


def variant_plan(model: Quillan, variant: str, cfg: ExportConfig) -> dict[str, str]:
    """{module name: precision} for the variant: every quantizing BitLinear, and in `mixed` with
    micro agents at int8, the micro-agent banks (`<council>.micro_down` ...). Others stay FP16."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown export variant {variant!r} (one of: {', '.join(VARIANTS)})")
    plan: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, BitLinear) and m.quantize:
            plan[name] = variant if variant != "mixed" else cfg.mixed.get(module_kind(name), "ternary")
        elif hasattr(m, "micro_down") and variant == "mixed" and cfg.mixed.get("micro_agents") == "int8":
            plan.update({f"{name}.{b}": "int8" for b in BANKS})  # PyTorch int8 rows: no bitsandbytes module
    return plan


# What computes each precision on the CPU (recorded in metadata.json).
KERNELS = {
    "ternary": "quillan TernaryLinear: 2-bit packed weights read directly by the native C++ kernel "
               "(AVX2, int8 activations, exact integer product); PyTorch integer-valued float32 GEMM "
               "where the kernel cannot be built",
    "int8": "bitsandbytes Linear8bitLt (LLM.int8, CPU backend int8_scaled_mm); micro-agent banks: "
            "PyTorch int8 rows with per-row scales (bitsandbytes has no module for parameter banks)",
    "int4": "bitsandbytes Linear4bit (blockwise NF4/FP4) on a weight zero-padded to 32 rows and 64-weight "
            "blocks; CPU backend: dequantize + float32 matmul, or with AVX512-BF16 a repacked BF16 kernel",
    "fp16": "torch float32 matmul on weights stored in FP16",
}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _set_bank(council: nn.Module, attr: str, bank: nn.Module) -> None:
    delattr(council, attr)  # a Parameter: remove it before a module takes the name
    setattr(council, attr, bank)


def dequantized_weight(m: nn.Module) -> torch.Tensor:
    """The float weight (out, in) — or bank (M, P, D) — an exported module computes with."""
    if isinstance(m, TernaryLinear):
        q = m.ternary().float()
        return q * (m.scale.view(-1, 1) if m.scale.dim() else m.scale)
    if isinstance(m, Int8Rows):
        return m.dequantized()
    if isinstance(m, Int4Linear):
        return m.dequantized()
    if "bitsandbytes" in type(m).__module__:
        return int8_dequantized(m)
    return m.weight.detach().float()


@torch.no_grad()
def _binarize_agent_banks(model: nn.Module, keep_flag: bool) -> None:
    """Under quant.plan adaptive, store the micro-agent banks as their binary values (±scale per
    row, exact in FP16 and in int8 rows). The model binarizes again after each gather, which
    changes nothing; the fp16 variant (a plain float model) drops the flag instead."""
    for m in model.modules():
        if getattr(m, "binary_weights", False):
            for bank in (m.micro_down, m.micro_up):
                bank.copy_(binary_quantize(bank))
            m.binary_weights = keep_flag


@torch.no_grad()
def convert(model: Quillan, variant: str, cfg: ExportConfig) -> tuple[Quillan, dict[str, str]]:
    """The model with its modules swapped for the variant's (in place, eval mode), and its plan.

    `fp16` returns a plain float model (config `quantize: false`) whose linear weights are the
    dequantized ternary weights scale·q: trainable, the starting point for further training.
    A tequila model's dead-zone biases become real biases (config `linear_bias: true`) in `fp16`
    and a bias of the exported layer in the other variants.
    """
    model.eval()
    plan = variant_plan(model, variant, cfg)
    _binarize_agent_banks(model, keep_flag=variant != "fp16")
    tequila = model.cfg.quant_method == "tequila"
    biases = {name: m.dead_zone_bias().detach() for name, m in model.named_modules()
              if tequila and name in plan and isinstance(m, BitLinear)}
    if variant == "fp16":
        ternary = {name: m.ternary_weight() for name, m in model.named_modules() if name in plan}
        for name, w in ternary.items():
            m = model.get_submodule(name)
            m.weight.copy_(w)
            m.quantize = False
        if tequila:
            for name, m in model.named_modules():
                if isinstance(m, BitLinear):
                    m.bias = nn.Parameter(biases.get(name, torch.zeros(m.out_features)))
                    m.method = "absmean"
        model.cfg = QuillanConfig(**{**model.cfg.to_dict(), "quantize": False, "quant_method": "absmean",
                                     "linear_bias": model.cfg.linear_bias or tequila})
        return model.half().float(), plan  # values rounded to FP16, as stored
    for name, precision in plan.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in BANKS:
            _set_bank(model.get_submodule(parent), leaf, Int8Rows.from_float(getattr(model.get_submodule(parent), leaf)))
            continue
        m = model.get_submodule(name)
        w, bias = m.ternary_weight(), biases.get(name)
        if precision == "ternary":
            new = TernaryLinear.from_float(m.weight, m.per_channel, m.act_quant, bias)
        elif precision == "int8":
            new = int8_linear(w, cfg.int8_threshold, bias)
        elif precision == "int4":
            new = Int4Linear.from_float(w, cfg.int4_type, bias)
        else:
            new = with_bias(nn.Linear(w.shape[1], w.shape[0], bias=False), bias)
            new.weight.copy_(w.half().float())
        _set_module(model, name, new)
    for p in model.parameters():  # what stays float is stored in FP16: hold the same values
        p.requires_grad_(False)
        if type(p) is nn.Parameter:  # not bitsandbytes' own parameter types
            p.data = p.data.half().float()
    attach_grouped_experts(model)
    return model.eval(), plan  # new modules start in train mode; LLM.int8 re-quantizes in training


def attach_grouped_experts(model: nn.Module) -> None:
    """Give every council layer whose experts are all native ternary SwiGLUs a grouped dispatch
    (`GroupedTernarySwiGLU`: three kernel calls per layer instead of three per expert); where the
    kernels do not load, none do and experts run one by one."""
    for m in model.modules():
        if isinstance(m, CouncilFFN) and GroupedTernarySwiGLU.supports(m.experts):
            m.grouped_experts = GroupedTernarySwiGLU(m.experts)


# -- files --------------------------------------------------------------------------------------
def _module_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """On-disk tensors of one quantized module (keys relative to the module)."""
    if isinstance(m, TernaryLinear):
        return m.export_tensors()
    if isinstance(m, Int8Rows):
        return {"q": m.q, "scale": m.scale}
    if isinstance(m, Int4Linear):
        return m.export_tensors()
    if isinstance(m, bitsandbytes().nn.Linear8bitLt):
        return int8_tensors(m)
    raise TypeError(f"not a quantized module: {type(m).__name__}")


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds: tuple[type, ...] = (TernaryLinear, Int8Rows, Int4Linear)
    if any("bitsandbytes" in type(m).__module__ for m in model.modules()):
        kinds += (bitsandbytes().nn.Linear8bitLt,)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def export_tensors(model: Quillan) -> dict[str, torch.Tensor]:
    """Every tensor of the exported model in its stored form, keys sorted (stable file bytes):
    quantized modules as their packed/int tensors, everything else FP16."""
    quant = _quantized_modules(model)
    out: dict[str, torch.Tensor] = {}
    for name, m in quant.items():
        out.update({f"{name}.{k}": v.detach().contiguous() for k, v in _module_tensors(m).items()})
    inside = tuple(f"{n}." for n in quant)
    for name, p in model.state_dict().items():
        if name.startswith(inside) or (model.cfg.tie_embeddings and name == "head.weight"):
            continue
        out[name] = p.detach().to(torch.float16).contiguous() if p.is_floating_point() else p.detach().contiguous()
    return {k: out[k] for k in sorted(out)}


def save(model: Quillan, directory: Path | str, variant: str, plan: dict[str, str], extra: dict[str, Any],
         tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Write `model.safetensors`, `metadata.json` (+ tokenizer) into `directory`; returns the metadata."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(model)
    # One metadata key only: safetensors writes the header's metadata from a hash map, so with two
    # keys their order (and the file's bytes) changed from one process to the next.
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "quillan-export"})
    shapes, stored = {}, {}
    for name in plan:
        m = model.get_submodule(name)
        shapes[name] = list(m.q.shape) if isinstance(m, Int8Rows) else [m.out_features, m.in_features]
        if isinstance(m, Int4Linear) and (m.inner.out_features, m.inner.in_features) != tuple(shapes[name]):
            stored[name] = [m.inner.out_features, m.inner.in_features]
    meta = {"format": "quillan-export", "variant": variant, "config": model.cfg.to_dict(), "modules": plan,
            "shapes": shapes, "weights_sha256": file_sha256(directory / WEIGHTS), **extra}
    if stored:  # INT4 layers stored zero-padded for bitsandbytes' CPU kernels (bnb_layers.int4_padded_shape)
        meta["int4_padded_shapes"] = stored
    (directory / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER), pretty=True)
    return meta


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA
    meta = read_json_file(path, "a Quillan export")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    for key in ("variant", "config", "modules", "shapes", "weights_sha256"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing key '{key}'")
    if meta["variant"] not in VARIANTS:
        raise CheckpointError(f"{path}: variant: unknown variant {meta['variant']!r} (one of: {', '.join(VARIANTS)})")
    return meta


def _take(tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    out = {k[len(prefix) + 1:]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix + ".")]}
    if not out:
        raise CheckpointError(f"{path}: no tensors for module {prefix!r} named in metadata.json")
    return out


def _rebuild(precision: str, t: dict[str, torch.Tensor], shape: list[int], cfg: QuillanConfig) -> nn.Module:
    """The inference module of one quantized layer from its stored tensors, shape-checked."""
    out_f, in_f = shape
    bias = t.get("bias")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias is {tuple(bias.shape)}, metadata says ({out_f},)")
    if precision == "ternary":
        return TernaryLinear.from_export(t["packed"], t["scale"], (out_f, in_f), act_quant=cfg.act_quant,
                                         bias=None if bias is None else bias.float())
    if precision == "int8":
        return int8_from_export(t, out_f, in_f)
    if precision == "int4":
        return Int4Linear.from_export(t, out_f, in_f)
    if precision == "fp16":
        lin = nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = t["weight"].float()
        return with_bias(lin, bias)
    raise ValueError(f"unknown precision {precision!r}")


@torch.no_grad()
def load(path: Path | str) -> tuple[Quillan, Tokenizer | None]:
    """A runnable model (eval mode) and its tokenizer from an export directory alone.

    Raises CheckpointError naming the file for a missing, truncated or corrupted file, or
    metadata that does not match the stored tensors.
    """
    directory = Path(path)
    meta = _read_metadata(directory)
    meta_path, weights = directory / METADATA, directory / WEIGHTS
    try:
        cfg = QuillanConfig(**meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: config: {e}") from None
    if not weights.exists():
        raise CheckpointError(f"{weights}: file not found")
    # safetensors has no checksum: a flipped bit in tensor data would load silently.
    if file_sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: sha256 differs from {METADATA}'s weights_sha256: the file is corrupted "
                              f"or was replaced; re-run the export")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own types for truncated/corrupt files
        raise CheckpointError(f"{weights}: cannot read weights ({type(e).__name__}: {e})") from None
    with torch.device("meta"):  # nothing allocated until the stored tensors are put in place
        model = Quillan(cfg).eval()
    replaced: list[str] = []  # names of the modules rebuilt from their stored form
    for name, precision in meta["modules"].items():
        if meta["variant"] == "fp16":
            break  # a plain float model: every weight is loaded below
        parent, _, leaf = name.rpartition(".")
        try:
            model.get_submodule(parent).get_parameter(leaf) if leaf in BANKS else model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{meta_path}: module {name!r} does not exist in this config") from None
        try:
            t = _take(tensors, name, weights)
            if leaf in BANKS:
                if list(t["q"].shape) != meta["shapes"][name] or t["q"].dtype != torch.int8:
                    raise ValueError(f"stored {t['q'].dtype} {tuple(t['q'].shape)}, metadata says int8 "
                                     f"{tuple(meta['shapes'][name])}")
                _set_bank(model.get_submodule(parent), leaf, Int8Rows(t["q"], t["scale"]))
            else:
                _set_module(model, name, _rebuild(precision, t, meta["shapes"][name], cfg))
            replaced.append(name)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{weights}: module {name} ({precision}) does not match {meta_path}: {e}") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    if cfg.tie_embeddings and "embed.weight" in state:
        state["head.weight"] = state["embed.weight"]
    expected = {k for k in model.state_dict() if not k.startswith(tuple(f"{n}." for n in replaced))}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not match {meta_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: does not match {meta_path}: {str(e).splitlines()[-1].strip()}") from None
    model.rope_cos, model.rope_sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise CheckpointError(f"{weights}: no stored value for {name}")
    for p in model.parameters():
        p.requires_grad_(False)
    attach_grouped_experts(model)
    tok = directory / TOKENIZER
    return model.eval(), (Tokenizer.from_file(str(tok)) if tok.exists() else None)
