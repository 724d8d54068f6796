"""Inference modules of the exports: packed ternary linear layers (W1.58A8) and int8 row banks.

`TernaryLinear` keeps its weights packed 4 per byte (2 bits per weight) in memory and computes
y = s_w · s_x · (q_x @ q_wᵀ) with q_x the per-token int8 activations (BitNet §2) and an exact
integer-valued matrix product: the same numbers as `BitLinear` in eval mode. The weights are
unpacked per call; no float copy of them is kept between calls.
"""

from __future__ import annotations

import torch
from torch import nn

from quillan.bitnet import activation_quantize, ternary_quantize
from quillan.packing import pack_2bit, pack_ternary, unpack_2bit, unpack_ternary


class TernaryLinear(nn.Module):
    """y = x Wᵀ for ternary W = scale · q, q ∈ {-1, 0, 1}^(out, in), packed 2 bits per weight.

    Buffers: `packed` (uint8, ceil(out·in / 4)) and `scale` (float32, () or (out, 1)).
    With `act_quant`, x is quantized per token to int8 and multiplied in integers.
    """

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, scale: torch.Tensor,
                 act_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.act_quant = in_features, out_features, act_quant
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.float())

    @classmethod
    def from_float(cls, weight: torch.Tensor, per_channel: bool = False, act_quant: bool = True) -> "TernaryLinear":
        """Quantize a float weight (out, in) with absmean (BitNet b1.58 eq. 1-3) and pack it."""
        q, scale = ternary_quantize(weight.detach().float(), per_channel)
        return cls(weight.shape[1], weight.shape[0], pack_2bit(q), scale, act_quant)

    @classmethod
    def from_export(cls, packed_1p6: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                    act_quant: bool = True) -> "TernaryLinear":
        """From the on-disk form: 5 weights per byte (`quillan.packing.pack_ternary`)."""
        q = unpack_ternary(packed_1p6, shape)
        return cls(shape[1], shape[0], pack_2bit(q), scale, act_quant)

    def ternary(self) -> torch.Tensor:
        """q (out, in) int8, unpacked on demand."""
        return unpack_2bit(self.packed, (self.out_features, self.in_features))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The on-disk form: `packed` at 1.6 bits per weight and `scale`."""
        return {"packed": pack_ternary(self.ternary()), "scale": self.scale.clone()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        q = self.ternary()
        if self.act_quant:
            xq, xs = activation_quantize(x2.float())
            # Integer-valued operands in float32: exact while in_features·127 < 2^24. On this
            # 2-core CPU torch._int_mm is 20-30x slower than the float GEMM at these widths.
            y = (xq.float() @ q.t().float()) * xs
        else:
            y = x2.float() @ q.t().float()
        y = y * (self.scale.view(1, -1) if self.scale.dim() else self.scale)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act_quant={self.act_quant}, bits=2"


class Int8Rows(nn.Module):
    """A parameter bank (M, P, D) stored as int8 rows with one float scale per row (absmax/127):
    PyTorch's own int8 path for the micro-agent banks, which bitsandbytes has no module for.
    Indexing a member, `bank[m]`, returns its dequantized rows (P, D)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float())

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Rows":
        scale = w.detach().float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0
        return cls((w.detach().float() / scale).round().clamp(-127, 127).to(torch.int8), scale)

    def __getitem__(self, member: int) -> torch.Tensor:
        return self.q[member].float() * self.scale[member]

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale

