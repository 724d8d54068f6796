"""What each export variant stores: `ExportConfig`, the module kinds, the per-module precision
plan of a variant, and the kernels that compute each precision (recorded in metadata.json)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from quillan.bitnet import BitLinear
from quillan.model import Quillan

Variant = Literal["ternary", "fp16", "int8", "int4", "mixed"]
VARIANTS = get_args(Variant)
Kind = Literal["attention", "experts", "micro_agents", "overseer", "dense_ffn", "diffusion"]
KINDS = get_args(Kind)
Precision = Literal["ternary", "fp16", "int8", "int4"]
BANKS = ("micro_keys", "micro_down", "micro_up")
HEAD = "head"  # the output head's module name in Quillan


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variants: list[Variant] = Field(
        default_factory=lambda: list(VARIANTS), min_length=1, description="exports to write")
    int4_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type")
    int8_threshold: float = Field(0.0, ge=0, description="LLM.int8() outlier threshold (0: all columns int8)")
    int8_head: bool = Field(
        False, description="store the output head as int8 rows with per-row scales (Int8Head, torch._int_mm) in "
                           "every variant but fp16: a quarter of the FP32 head's bytes, which batch-1 decoding reads "
                           "every token (faster decoding; slower 512-row prefill where oneDNN's int8 GEMM is slow)")
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
    """{module name: precision} for the variant: every quantizing BitLinear, in `mixed` with
    micro agents at int8 the micro-agent banks (`<council>.micro_down` ...), with `int8_head` the
    output head (`head`: int8). Others stay FP16."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown export variant {variant!r} (one of: {', '.join(VARIANTS)})")
    plan: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, BitLinear) and m.quantize:
            plan[name] = variant if variant != "mixed" else cfg.mixed.get(module_kind(name), "ternary")
        elif hasattr(m, "micro_down") and variant == "mixed" and cfg.mixed.get("micro_agents") == "int8":
            plan.update({f"{name}.{b}": "int8" for b in BANKS})  # PyTorch int8 rows: no bitsandbytes module
    if cfg.int8_head and variant != "fp16":  # fp16 is the trainable float copy
        plan[HEAD] = "int8"
    return plan


# What computes each precision on the CPU (recorded in metadata.json).
KERNELS = {
    "ternary": "quillan TernaryLinear: 2-bit packed weights read directly by the native C++ kernel "
               "(AVX-512 VNNI, AVX2 or scalar by the CPU: ternary_kernel_path; int8 activations, exact integer "
               "product); PyTorch integer-valued float32 GEMM where the kernel cannot be built",
    "int8": "bitsandbytes Linear8bitLt (LLM.int8, CPU backend int8_scaled_mm); micro-agent banks: "
            "PyTorch int8 rows with per-row scales (bitsandbytes has no module for parameter banks); output head "
            "(export.int8_head): int8 rows and per-token int8 activations in torch._int_mm (oneDNN)",
    "int4": "bitsandbytes Linear4bit (blockwise NF4/FP4) on a weight zero-padded to 32 rows and 64-weight "
            "blocks; CPU backend: dequantize + float32 matmul, or with AVX512-BF16 a repacked BF16 kernel",
    "fp16": "torch float32 matmul on weights stored in FP16",
}
