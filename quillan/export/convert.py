"""`convert`: a trained model with its modules swapped for an export variant's (packed ternary
`TernaryLinear`, bitsandbytes INT8 / padded INT4, FP16, int8 bank rows), and the float weight each
exported module computes with."""

from __future__ import annotations

import torch
from torch import nn

from quillan.bitnet import BitLinear, binary_quantize
from quillan.config import QuillanConfig
from quillan.export.bnb_layers import Int4Linear, int8_dequantized, int8_linear, with_bias
from quillan.export.layers import GroupedTernarySwiGLU, Int8Head, Int8Rows, TernaryLinear
from quillan.export.plan import BANKS, HEAD, ExportConfig, variant_plan
from quillan.model import Quillan
from quillan.moe import CouncilFFN


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def replace_bank(council: nn.Module, attr: str, bank: nn.Module) -> None:
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
        if name == HEAD:
            replace_module(model, name, Int8Head.from_float(model.head.weight.detach()))
            continue
        if leaf in BANKS:
            replace_bank(model.get_submodule(parent), leaf, Int8Rows.from_float(getattr(model.get_submodule(parent), leaf)))
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
        replace_module(model, name, new)
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
