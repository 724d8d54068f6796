"""Ternary weight packing: 5 trits per byte (3^5 = 243 ≤ 256) → 1.6 bits per weight.

log2(3) ≈ 1.585 bits is the limit; 1.6 is within 1 %. Storage uses this layout; in memory, for
compute, the exports hold 2-bit codes in the kernel layout of `quillan.kernels.pack_i2`.
"""

from __future__ import annotations

import math

import torch

_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def _decode_table() -> torch.Tensor:
    """(243, 5) int8: the five trits (-1/0/1) of every valid byte, least significant first."""
    codes = torch.arange(243, dtype=torch.int32)[:, None]
    return ((codes // _POW3) % 3 - 1).to(torch.int8)


_TABLE = _decode_table()


def packed_size(numel: int) -> int:
    """Bytes that `pack_ternary` uses for `numel` weights."""
    return math.ceil(numel / 5)


def _check_ternary(q: torch.Tensor) -> None:
    if q.numel() and (q.min() < -1 or q.max() > 1):
        raise ValueError(f"pack_ternary expects values in {{-1, 0, 1}}, got range [{int(q.min())}, {int(q.max())}]")


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Pack a ternary tensor (any shape, values in {-1,0,1}) to uint8, 5 weights per byte.

    Output shape `(ceil(numel / 5),)`. Byte value = Σ_i (q_i + 1)·3^i over its five weights
    in flattened (row-major) order; the tail is padded with zeros.
    """
    _check_ternary(q)
    flat = q.reshape(-1).to(torch.int32) + 1
    pad = (-flat.numel()) % 5
    if pad:
        flat = torch.cat([flat, torch.ones(pad, dtype=torch.int32)])  # pads decode to 0
    return (flat.view(-1, 5) * _POW3).sum(dim=1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_ternary`: int8 tensor of `shape`. Raises ValueError on a length or
    byte value that cannot come from `pack_ternary`."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != packed_size(numel):
        raise ValueError(f"packed length {packed.numel()} does not match shape {tuple(shape)} "
                         f"(needs {packed_size(numel)} bytes)")
    idx = packed.to(torch.int64)
    if idx.numel() and int(idx.max()) >= 243:
        raise ValueError(f"packed byte {int(idx.max())} is not a valid 5-trit code (< 243)")
    return _TABLE[idx].reshape(-1)[:numel].reshape(shape)


def bits_per_weight(numel: int, nbytes: int) -> float:
    return 8.0 * nbytes / numel if numel else 0.0
