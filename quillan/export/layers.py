"""Inference modules of the exports: packed ternary linear layers (W1.58A8) and int8 row banks.

`TernaryLinear` keeps its weights packed 4 per byte (2 bits per weight, the I2 layout of
`quillan.kernels`) and computes y = s_w · s_x · (q_x @ q_wᵀ) with q_x the per-token int8
activations (BitNet §2) and an exact integer product: the same numbers as `BitLinear` in eval
mode. No float copy of the weights exists between calls.

Kernel paths (`TernaryLinear.PATHS`), all giving bit-identical outputs:
- `native`: the C++ kernel reading the packed weights directly (AVX-512 VNNI `vpdpbusd` or AVX2
  `maddubs` on 2-bit codes, by the CPU: `quillan.kernels.path()`), fused with the activation
  quantization; one call per layer. The default where it builds.
- `float`: PyTorch only: codes unpacked per call to an integer-valued float32 matrix, float GEMM
  (exact while in_features · 127 < 2^24). The fallback where the kernel cannot be built.
- `int_mm`: PyTorch only: codes unpacked per call to a transposed int8 copy, then `torch._int_mm`;
  the per-call copy makes it slow (bench/linear.py's `ternary_int_mm_ms`), so never chosen. A layer
  holding int8 weights (`int8_held_ms` there) is the int8 ceiling, at 4× the ternary bytes.

`GroupedTernarySwiGLU` runs every expert of a council layer with three native calls in all
(w1, w3, w2 of all experts at once) instead of three per expert.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quillan import kernels
from quillan.bitnet import EPS, activation_quantize, ternary_quantize
from quillan.packing import pack_ternary, unpack_ternary


def default_path() -> str:
    """`native` if the C++ kernels load (they win at every shape bench/linear.py measures), else `float`."""
    return "native" if kernels.library() is not None else "float"


class TernaryLinear(nn.Module):
    """y = x Wᵀ for ternary W = scale · q, q ∈ {-1, 0, 1}^(out, in), packed 2 bits per weight.

    Buffers: `packed` (uint8, (out, ceil(in / 128) · 32)) and `scale` (float32, () or (out, 1)),
    and `bias` (float32, (out,)) when given: tequila's precomputed dead-zone bias.
    With `act_quant`, x is quantized per token to int8 and multiplied in integers.
    """

    PATHS = ("native", "float", "int_mm")

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, scale: torch.Tensor,
                 act_quant: bool = True, bias: torch.Tensor | None = None):
        super().__init__()
        expected = (out_features, kernels.padded(in_features) // 4)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
            raise ValueError(f"packed weights must be uint8 {expected} for ({out_features}, {in_features}), "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        self.in_features, self.out_features, self.act_quant = in_features, out_features, act_quant
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.float())
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.path = default_path()

    @classmethod
    def from_float(cls, weight: torch.Tensor, per_channel: bool = False, act_quant: bool = True,
                   bias: torch.Tensor | None = None) -> "TernaryLinear":
        """Quantize a float weight (out, in) with absmean (BitNet b1.58 eq. 1-3) and pack it."""
        q, scale = ternary_quantize(weight.detach().float(), per_channel)
        return cls(weight.shape[1], weight.shape[0], kernels.pack_i2(q), scale, act_quant, bias)

    @classmethod
    def from_export(cls, packed_1p6: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                    act_quant: bool = True, bias: torch.Tensor | None = None) -> "TernaryLinear":
        """From the on-disk form: 5 weights per byte (`quillan.packing.pack_ternary`)."""
        q = unpack_ternary(packed_1p6, shape)
        return cls(shape[1], shape[0], kernels.pack_i2(q), scale, act_quant, bias)

    def ternary(self) -> torch.Tensor:
        """q (out, in) int8, unpacked on demand."""
        return kernels.unpack_i2(self.packed, self.in_features)

    def weight_bytes(self) -> int:
        """Bytes of the packed codes in memory (the scale adds 4 bytes, or 4 per row if per channel)."""
        return self.packed.numel()

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The on-disk form: `packed` at 1.6 bits per weight, `scale` (and `bias` if any)."""
        out = {"packed": pack_ternary(self.ternary()), "scale": self.scale.clone()}
        if self.bias is not None:
            out["bias"] = self.bias.clone()
        return out

    def forward(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """x (..., in) float → (..., out) in x's dtype. `path` overrides `self.path` (benchmarks, tests)."""
        path = path or self.path
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not self.act_quant:  # float activations against the ternary weights (no integer product)
            y = x2.float() @ self.ternary().t().float()
        elif path == "native":
            y = kernels.ternary_linear(x2, self.packed, self.in_features, self.scale, EPS)
        else:
            xq, xs = activation_quantize(x2.float())
            if path == "int_mm":
                y = torch._int_mm(xq, self.ternary().t().contiguous()).float() * xs
            elif path == "float":
                y = (xq.float() @ self.ternary().t().float()) * xs
            else:
                raise ValueError(f"unknown kernel path {path!r} (one of: {', '.join(self.PATHS)})")
        if path != "native" or not self.act_quant:
            y = y * (self.scale.view(1, -1) if self.scale.dim() else self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, act_quant={self.act_quant}, "
                f"bits=2, path={self.path}")


class GroupedTernarySwiGLU:
    """The E SwiGLU experts of a council layer as one grouped W1.58A8 computation (native kernel).

    Called with x (A, D), the rows routed to expert 0, then expert 1, ... (`counts` (E,) rows
    each), it returns (A, D): row for row the same bits as running each expert's
    w2(silu(w1 x) * w3 x) on its rows, but with three kernel calls whatever E is, so the layer's
    cost follows its active experts. Each expert's TernaryLinear buffers become views of the
    stacked weights: no second copy. A plain object, not a Module: it adds nothing to state_dict.
    """

    def __init__(self, experts: Sequence[nn.Module]):
        self.weights = {}
        for name in ("w1", "w3", "w2"):
            layers: list[TernaryLinear] = [getattr(e, name) for e in experts]
            packed = torch.stack([m.packed for m in layers])                         # (E, N, K_pad / 4)
            scale = torch.stack([m.scale.reshape(-1).expand(m.out_features) for m in layers])  # (E, N)
            for i, m in enumerate(layers):
                m.packed = packed[i]
            self.weights[name] = (packed, scale.contiguous(), layers[0].in_features)

    @staticmethod
    def supports(experts: Sequence[nn.Module]) -> bool:
        """True if every expert is a SwiGLU of act-quantized, bias-free TernaryLinear layers and the
        kernels load."""
        return kernels.library() is not None and all(
            isinstance(getattr(e, n, None), TernaryLinear) and getattr(e, n).act_quant and getattr(e, n).bias is None
            for e in experts for n in ("w1", "w3", "w2"))

    def _linear(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        packed, scale, k = self.weights[name]
        return kernels.grouped_ternary_linear(x, packed, k, scale, counts, EPS)

    def __call__(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        h = F.silu(self._linear("w1", x, counts)) * self._linear("w3", x, counts)
        return self._linear("w2", h, counts).to(x.dtype)


def int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows of w (..., D): (q int8 (..., D), scale float32 (..., 1) = absmax / 127)."""
    w = w.detach().float()
    scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


class Int8Rows(nn.Module):
    """A float tensor (..., D) stored as int8 rows with one float scale per row (absmax/127): the
    micro-agent banks (M, P, D), which bitsandbytes has no module for, and (as `Int8Head`) the
    output head. Indexing a bank's member, `bank[m]`, returns its dequantized rows (P, D)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if q.dtype != torch.int8 or tuple(scale.shape) != (*q.shape[:-1], 1):
            raise ValueError(f"need int8 q (..., D) and one scale per row (..., 1), got {q.dtype} "
                             f"{tuple(q.shape)} and {tuple(scale.shape)}")
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float())

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Rows":
        return cls(*int8_per_row(w))

    def __getitem__(self, member: int) -> torch.Tensor:
        return self.q[member].float() * self.scale[member]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized rows idx (any shape, indices into the flattened (M·P) rows): (*idx.shape, D)."""
        d = self.q.shape[-1]
        return F.embedding(idx, self.q.reshape(-1, d)).float() * F.embedding(idx, self.scale.reshape(-1, 1))

    def dequantized(self) -> torch.Tensor:
        """The float tensor the module computes with, q's shape."""
        return self.q.float() * self.scale


class Int8Head(Int8Rows):
    """The output head (vocab, dim) as int8 rows, one scale per vocabulary row, with per-token int8
    activations (BitNet §2's quantizer): logits = (q_x @ qᵀ) · s_x · s_w, the integer product in
    `quillan.kernels.int8_rows_linear` (VPDPBUSD, or maddubs on AVX2) or `torch._int_mm` (oneDNN). A quarter of the FP32 head's bytes,
    which is what batch-1 decoding reads for it every token."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        if q.dim() != 2:
            raise ValueError(f"need int8 q (vocab, dim), got {tuple(q.shape)}")
        super().__init__(q, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) float → logits (..., vocab) float32: the native int8-rows loop where the
        kernels have one (VPDPBUSD, or AVX2's maddubs; faster than `torch._int_mm` at every row count
        bench/head.py measures: oneDNN re-lays the transposed weights on each call), else
        `torch._int_mm`; the same bits."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        y = kernels.int8_rows_linear(x2, self.q, self.scale, EPS)
        if y is None:
            xq, xs = activation_quantize(x2)
            y = (torch._int_mm(xq, self.q.t()).float() * xs) * self.scale.view(1, -1)
        return y.view(*shape[:-1], self.q.shape[0])
