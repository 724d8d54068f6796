"""bitsandbytes layers of the `int8` / `int4` exports: builders from a float weight, rebuilders from
stored tensors, and the padded INT4 layer.

bitsandbytes is imported on first use (~6 s): only int8/int4 exports pay for it.

Why INT4 layers are padded: on CPUs with AVX512-BF16, bitsandbytes' `Linear4bit.forward` (eval
mode, no grad) repacks its weight once into a blocked layout
(`bitsandbytes.functional._convert_weight_packed_for_cpu`) that needs the output features N to be
a multiple of 32 and the input features K a multiple of the quantization block (the block scales
are reshaped to [N, K // blocksize]). Other shapes fail there with an AssertionError or a reshape
error, and only on those CPUs. `Int4Linear` therefore quantizes a zero-padded weight of a shape
every CPU path accepts, pads the input with zeros and slices the output: the padded columns meet
zero inputs and the padded rows are dropped, so it computes the unpadded layer. The padding is
done on every CPU, so the exported files are the same bytes everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

INT4_BLOCK_N = 32  # rows per block of bitsandbytes' CPU repacking (`block_n` of _convert_weight_packed_for_cpu)
INT4_BLOCKSIZE = 64  # bitsandbytes' 4-bit quantization block on CPU (Params4bit's default)


def bitsandbytes():
    """The bitsandbytes module, imported on first use (~6 s)."""
    import bitsandbytes as bnb

    # Every LLM.int8 call on float32 input logs that it casts to FP16; that is the method. The CPU
    # 4-bit path logs once that the optional `kernels` package is missing; its own C path runs.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return bnb


def with_bias(lin: nn.Module, bias: torch.Tensor | None) -> nn.Module:
    """`lin` with a float bias parameter (tequila's dead-zone bias), or unchanged without one."""
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return lin


def int4_padded_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """(rows, cols) of the stored INT4 weight: out rounded up to 32, in up to the 64-weight block."""
    return (-(-out_features // INT4_BLOCK_N) * INT4_BLOCK_N, -(-in_features // INT4_BLOCKSIZE) * INT4_BLOCKSIZE)


class Int4Linear(nn.Module):
    """y = x Wᵀ (+ b) with W (out, in) stored as bitsandbytes NF4/FP4 on a zero-padded
    (rows, cols) = `int4_padded_shape(out, in)` weight. Input (..., in) float32 → (..., out)."""

    def __init__(self, inner: nn.Module, out_features: int, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        if (inner.out_features, inner.in_features) != int4_padded_shape(out_features, in_features):
            raise ValueError(f"inner Linear4bit is ({inner.out_features}, {inner.in_features}), a "
                             f"({out_features}, {in_features}) layer stores {int4_padded_shape(out_features, in_features)}")
        self.inner, self.out_features, self.in_features = inner, out_features, in_features
        if bias is None:
            self.register_parameter("bias", None)
        else:
            with_bias(self, bias)
        # The stored form, kept apart: bitsandbytes rewrites `inner.weight` in place at its first
        # AVX512-BF16 forward (repacked layout, BF16 block scales), which must not reach the files.
        self._stored = {k: v.detach().clone() for k, v in _linear4bit_state(inner).items()}

    @classmethod
    def from_float(cls, weight: torch.Tensor, quant_type: str, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Quantize a float weight (out, in) blockwise to NF4/FP4 (bitsandbytes, blocks of 64)."""
        bnb = bitsandbytes()
        out_f, in_f = weight.shape
        rows, cols = int4_padded_shape(out_f, in_f)
        padded = F.pad(weight.detach().float(), (0, cols - in_f, 0, rows - out_f))
        # No double quantization: its second-level tables cost ~1 KiB per layer, more than it saves here.
        lin = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.float32,
                                compress_statistics=False, quant_type=quant_type)
        lin.weight = bnb.nn.Params4bit(padded, requires_grad=False, compress_statistics=False,
                                       quant_type=quant_type, blocksize=INT4_BLOCKSIZE, module=lin)
        return cls(lin.to("cpu").eval(), out_f, in_f, bias)  # .to quantizes

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> "Int4Linear":
        """Rebuild from `export_tensors()`; ValueError when they do not fit (out, in)."""
        bnb = bitsandbytes()
        rows, cols = int4_padded_shape(out_features, in_features)
        lin = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.float32)
        lin.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], _quant_stats(tensors), device="cpu",
                                                         module=lin)
        if tuple(lin.weight.quant_state.shape) != (rows, cols):
            raise ValueError(f"quant state shape {tuple(lin.weight.quant_state.shape)}, a ({out_features}, "
                             f"{in_features}) layer stores {(rows, cols)} (padded for bitsandbytes' CPU kernels)")
        bias = tensors.get("bias")
        return cls(lin.eval(), out_features, in_features, None if bias is None else bias.float())

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """On-disk tensors: the padded 4-bit weight and its quant state (bitsandbytes' own keys), bias."""
        return {**self._stored, **({"bias": self.bias.detach()} if self.bias is not None else {})}

    def dequantized(self) -> torch.Tensor:
        """The float weight (out, in) this layer computes with (padding removed)."""
        bnb = bitsandbytes()
        state = bnb.functional.QuantState.from_dict(_quant_stats(self._stored), device=torch.device("cpu"))
        w = bnb.functional.dequantize_4bit(self._stored["weight"], state).float()
        return w[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.inner.in_features - self.in_features
        y = self.inner(F.pad(x, (0, pad)) if pad else x)
        if self.inner.out_features != self.out_features:
            y = y[..., : self.out_features]
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"stored={tuple(int4_padded_shape(self.out_features, self.in_features))}")


def _quant_stats(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bitsandbytes' quant-state entries of stored Linear4bit tensors (the `weight.*` keys, prefix dropped)."""
    return {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}


def _linear4bit_state(lin: nn.Module) -> dict[str, Any]:
    sd: dict[str, torch.Tensor] = {}
    lin._save_to_state_dict(sd, "", keep_vars=False)
    return sd


def int8_linear(weight: torch.Tensor, threshold: float, bias: torch.Tensor | None = None) -> nn.Module:
    """bitsandbytes Linear8bitLt (LLM.int8 row-wise absmax) of a float weight (out, in)."""
    bnb = bitsandbytes()
    lin = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False,
                              threshold=threshold)
    lin.weight = bnb.nn.Int8Params(weight.detach().to(torch.float16), requires_grad=False, has_fp16_weights=False)
    return with_bias(lin.to("cpu"), bias)  # .to quantizes


def int8_from_export(tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> nn.Module:
    """Rebuild a Linear8bitLt from its stored `weight` (int8), `SCB` (and `bias`); ValueError on a mismatch."""
    if tensors["weight"].shape != (out_features, in_features) or tensors["weight"].dtype != torch.int8:
        raise ValueError(f"weight is {tensors['weight'].dtype} {tuple(tensors['weight'].shape)}, "
                         f"metadata says int8 {(out_features, in_features)}")
    bnb = bitsandbytes()
    lin = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
    w = bnb.nn.Int8Params(tensors["weight"], requires_grad=False, has_fp16_weights=False)
    w.CB, w.SCB = tensors["weight"], tensors["SCB"].float()
    lin.weight = w
    return with_bias(lin, tensors.get("bias"))


def int8_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """On-disk tensors of a Linear8bitLt: int8 `weight`, row scales `SCB` (and `bias`)."""
    scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
    cb = m.weight.data if m.weight.data.dtype == torch.int8 else m.state.CB
    return {"weight": cb, "SCB": scb, **({"bias": m.bias.detach()} if m.bias is not None else {})}


def int8_dequantized(m: nn.Module) -> torch.Tensor:
    """The float weight (out, in) a Linear8bitLt computes with."""
    t = int8_tensors(m)
    return t["weight"].float() * t["SCB"].float().view(-1, 1) / 127.0
