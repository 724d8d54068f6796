"""The export file format: `model.safetensors` (quantized modules in their stored form, everything
else FP16, keys sorted) + `metadata.json` (+ `tokenizer.json`) + `checksums.json` (as in model
directories, quillan.checkpoint); `save` writes it, `load` rebuilds a runnable model from the
directory alone, shape- and checksum-checked. No pickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from quillan.checkpoint import CheckpointError, load_weights, read_json_file, verify_checksums, write_checksums
from quillan.config import QuillanConfig
from quillan.export.bnb_layers import Int4Linear, bitsandbytes, int8_from_export, int8_tensors, with_bias
from quillan.export.convert import attach_grouped_experts, replace_bank, replace_module
from quillan.export.layers import Int8Head, Int8Rows, TernaryLinear
from quillan.export.plan import BANKS, HEAD, VARIANTS
from quillan.export.stats import size_stats
from quillan.model import Quillan, derived_buffers

WEIGHTS, METADATA, TOKENIZER = "model.safetensors", "metadata.json", "tokenizer.json"

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
    """Write `model.safetensors`, `metadata.json` (format, plan, shapes, sizes and bits per weight
    (`stats.size_stats`), plus `extra`), the tokenizer and `checksums.json` of all three into
    `directory`; returns the metadata."""
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
    with torch.device("meta"):  # the float model's parameter count, nothing allocated
        n_params = Quillan(model.cfg).num_parameters()
    meta = {"format": "quillan-export", "variant": variant, "config": model.cfg.to_dict(), "modules": plan,
            "shapes": shapes, **size_stats(directory / WEIGHTS, tensors, shapes, n_params), **extra}
    if stored:  # INT4 layers stored zero-padded for bitsandbytes' CPU kernels (bnb_layers.int4_padded_shape)
        meta["int4_padded_shapes"] = stored
    (directory / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER), pretty=True)
    write_checksums(directory, [WEIGHTS, METADATA] + ([TOKENIZER] if tokenizer is not None else []))
    return meta


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA
    meta = read_json_file(path, "a Quillan export")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    for key in ("variant", "config", "modules", "shapes"):
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
    # safetensors has no checksum: a flipped bit in tensor data would load silently.
    verify_checksums(directory)
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
            if leaf in BANKS or name == HEAD:
                if list(t["q"].shape) != meta["shapes"][name] or t["q"].dtype != torch.int8:
                    raise ValueError(f"stored {t['q'].dtype} {tuple(t['q'].shape)}, metadata says int8 "
                                     f"{tuple(meta['shapes'][name])}")
                if name == HEAD:
                    replace_module(model, name, Int8Head(t["q"], t["scale"]))
                else:
                    replace_bank(model.get_submodule(parent), leaf, Int8Rows(t["q"], t["scale"]))
            else:
                replace_module(model, name, _rebuild(precision, t, meta["shapes"][name], cfg))
            replaced.append(name)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{weights}: module {name} ({precision}) does not match {meta_path}: {e}") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    load_weights(model, state, weights, meta_path, skip=tuple(f"{n}." for n in replaced), assign=True)
    for name, t in derived_buffers(cfg).items():
        setattr(model, name, t)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise CheckpointError(f"{weights}: no stored value for {name}")
    for p in model.parameters():
        p.requires_grad_(False)
    attach_grouped_experts(model)
    tok = directory / TOKENIZER
    return model.eval(), (Tokenizer.from_file(str(tok)) if tok.exists() else None)
