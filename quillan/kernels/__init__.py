"""Native W1.58A8 kernels for packed ternary weights (`ternary.cpp`), loaded with ctypes.

The shared library is compiled from `ternary.cpp` with the system C++ compiler (`-O3
-march=native -fopenmp`, so the library takes the widest instruction path this CPU has:
AMX int8 tiles (with AVX-512 VNNI for small batches), AVX-512 VNNI, AVX2 or scalar, named by
`path()`; `QUILLAN_KERNEL_ARCH` sets another `-march`, e.g. `cascadelake` for the VNNI path without
AMX, `haswell` for the AVX2 path or `x86-64` for the scalar one) by `make install` (`python -m quillan.kernels`), or on first use, into
a cache keyed by the source, the flags and this CPU's feature flags
(`$QUILLAN_KERNEL_CACHE`, default `~/.cache/quillan/kernels`). Where it cannot be built, `library()`
returns None after one warning and callers use PyTorch's int8 path.

OpenMP: the library links `libgomp.so.1`; PyTorch has already loaded its own copy under that
name, so both share one thread pool instead of two pools fighting over the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from quillan.machine import cpu_flags

SOURCE = Path(__file__).with_name("ternary.cpp")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BLOCK = 128  # weights per 32-byte block of the I2 layout (see ternary.cpp)
PATHS = ("amx_int8", "avx512_vnni", "avx2", "scalar")  # ternary.cpp's instruction paths, widest first

_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


class KernelBuildError(RuntimeError):
    """The C++ compiler is missing or failed; the message has its output."""


def compiler_flags() -> list[str]:
    """The C++ flags: FLAGS and `-march=$QUILLAN_KERNEL_ARCH` (default `native`)."""
    return [*FLAGS, f"-march={os.environ.get('QUILLAN_KERNEL_ARCH') or 'native'}"]


def library_path() -> Path:
    """Where the library for this source, these flags and this CPU lives (built or not)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(compiler_flags()).encode() + " ".join(sorted(cpu_flags())).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("QUILLAN_KERNEL_CACHE", Path.home() / ".cache" / "quillan" / "kernels"))
    return cache / f"libquillan_ternary-{key}.so"


def build(force: bool = False) -> Path:
    """Compile `ternary.cpp` into `library_path()` (atomically: concurrent builds are safe)."""
    target = library_path()
    if target.exists() and not force:
        return target
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *compiler_flags(), str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(f"{cxx} failed on {SOURCE}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, f32, ptr, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.qk_version.restype = i32
    lib.qk_path.restype = ctypes.c_char_p
    lib.qk_amx_refused.restype = i32
    lib.qk_quantize_rows.argtypes = [ptr, i64, i64, i64, f32, ptr, ptr]
    lib.qk_grouped_linear.argtypes = [ptr, i64, i64, i64, f32, ptr, i64, i64, ptr, ptr, ptr]
    lib.qk_linear.argtypes = [ptr, i64, i64, i64, f32, ptr, i64, ptr, i64, ptr]
    lib.qk_int8_rows.argtypes = [ptr, i64, i64, f32, ptr, i64, ptr, ptr]
    lib.qk_int8_rows.restype = i32
    lib.qk_has_int8_rows.restype = i32
    for fn in (lib.qk_quantize_rows, lib.qk_grouped_linear, lib.qk_linear):
        fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them if needed; None (after one warning) if that fails.
    `QUILLAN_KERNELS=off` skips them."""
    global _lib, _tried, _reason
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("QUILLAN_KERNELS", "").lower() in ("off", "0", "false"):
        _reason = "QUILLAN_KERNELS=off"
        return None
    try:
        _lib = _declare(ctypes.CDLL(str(build())))
    except (KernelBuildError, OSError) as e:
        _reason = str(e).splitlines()[0]
        warnings.warn(f"quillan: native ternary kernels unavailable ({_reason}); using the PyTorch int8 path",
                      RuntimeWarning, stacklevel=2)
        _lib = None
    return _lib


def _required() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"native ternary kernels unavailable ({_reason})")
    return lib


def path() -> str | None:
    """The instruction path the loaded library runs (`PATHS`), or None where it is unavailable.
    Fixed when the library is compiled for this CPU (`-march=native`)."""
    lib = library()
    return None if lib is None else lib.qk_path().decode()


def amx_refused() -> bool:
    """True where the library was built with the AMX path but Linux refused this process the tile
    state (arch_prctl ARCH_REQ_XCOMP_PERM): `path()` then names the VNNI path."""
    lib = library()
    return lib is not None and bool(lib.qk_amx_refused())


def unavailable_reason() -> str:
    """Why `library()` returned None ('' if it did not)."""
    return _reason


def padded(k: int) -> int:
    """K rounded up to whole 128-weight blocks."""
    return -(-k // BLOCK) * BLOCK


def pack_i2(q: torch.Tensor) -> torch.Tensor:
    """Ternary q (N, K) in {-1, 0, 1} → uint8 (N, padded(K) / 4) in the I2 layout of ternary.cpp:
    codes q + 1, zero-padded to whole blocks; byte j of block b holds weights 128b + 32i + j at
    bits 2i (i = 0..3)."""
    n, k = q.shape
    codes = torch.ones(n, padded(k), dtype=torch.uint8)  # code 1 = weight 0
    codes[:, :k] = (q.to(torch.int16) + 1).to(torch.uint8)
    c = codes.view(n, -1, 4, 32)  # (N, blocks, i, j)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(n, -1).contiguous()


def unpack_i2(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_i2`: int8 (N, K)."""
    n = packed.shape[0]
    b = packed.view(n, -1, 1, 32)
    codes = torch.cat([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=2)  # (N, blocks, 4, 32)
    return (codes.reshape(n, -1)[:, :k].to(torch.int8) - 1)


def quantize_activations(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's per-token int8 quantization of x (M, K) float32: (q (M, K) int8, scale (M, 1)),
    bit-identical to `quillan.bitnet.activation_quantize`. Requires `library()`."""
    lib = _required()
    x = x.float().contiguous()
    m, k = x.shape
    q = torch.empty(m, padded(k), dtype=torch.int8)
    scale = torch.empty(m, 1, dtype=torch.float32)
    lib.qk_quantize_rows(x.data_ptr(), m, k, padded(k), eps, q.data_ptr(), scale.data_ptr())
    return q[:, :k], scale


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, k: int, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """y (M, N) float32 = per-token int8 x (M, K) times the I2-packed ternary weights, rescaled.
    `scale` is float32 of shape () or (N, 1). Requires `library()`.

    The one-group case of `grouped_ternary_linear` (the same kernel and bits), called without the
    per-call offsets and expanded scales: at batch 1 the Python side is half of a call's time."""
    lib = _required()
    n = packed.shape[0]
    x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    scale = scale if scale.dtype == torch.float32 and scale.is_contiguous() else scale.float().contiguous()
    if scale.numel() not in (1, n):
        raise ValueError(f"scale has {scale.numel()} values for {n} weight rows (1 or {n})")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        lib.qk_linear(x.data_ptr(), m, k, padded(k), eps, packed.data_ptr(), n, scale.data_ptr(), scale.numel(),
                      y.data_ptr())
    return y


def has_int8_rows() -> bool:
    """Whether the loaded library has an int8-rows loop (VPDPBUSD on the `avx512_vnni` and `amx_int8`
    builds, maddubs on `avx2`; not the scalar build), as the build itself reports it."""
    lib = library()
    return lib is not None and bool(lib.qk_has_int8_rows())


def int8_rows_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor | None:
    """y (M, N) float32 = per-token int8 x (M, K) times int8 weights q (N, K) with one float32 scale per
    row (N, 1): ((q_x @ qᵀ) · s_x) · s_wᵀ, bit-identical to that `torch._int_mm` expression. q must lie in
    [-127, 127] (symmetric int8, as `quillan.export.layers.int8_rows` makes it): the AVX2 loop moves
    the activations' signs onto q, and -128 has no negation in int8. None where the library has no
    int8-rows loop (the scalar build) or is unavailable: keep the caller's path."""
    if not has_int8_rows():
        return None
    lib = library()
    n, k = q.shape
    if q.dtype != torch.int8 or not q.is_contiguous() or scale.numel() != n:
        raise ValueError(f"need contiguous int8 q (N, K) and N scales, got {q.dtype} {tuple(q.shape)} and {scale.numel()}")
    x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns for weights of {k}")
    if k >= 65536:  # Σ (w + 128)·q_x reaches 255 · 128 · K: past int32 from K = 65,536
        raise ValueError(f"K = {k}: the int8-rows loop sums in int32 and needs K < 65536")
    scale = scale if scale.dtype == torch.float32 and scale.is_contiguous() else scale.float().contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0] and not lib.qk_int8_rows(x.data_ptr(), x.shape[0], k, eps, q.data_ptr(), n, scale.data_ptr(),
                                           y.data_ptr()):
        raise RuntimeError("qk_int8_rows declined although qk_has_int8_rows said yes")
    return y


def grouped_ternary_linear(x: torch.Tensor, packed: torch.Tensor, k: int, scale: torch.Tensor,
                           counts: torch.Tensor, eps: float) -> torch.Tensor:
    """One product per expert in a single call: x (M, K) holds the rows of expert 0, then expert 1,
    ... (`counts` (G,) rows each, summing to M); `packed` (G, N, padded(K) / 4) uint8 holds every
    expert's I2-packed weights and `scale` (G, N) float32 their per-row scales. Returns y (M, N)
    float32, row for row the same bits as `ternary_linear` with each expert's weights.
    Requires `library()`."""
    lib = _required()
    g, n = packed.shape[0], packed.shape[1]
    if counts.shape != (g,) or scale.shape != (g, n):
        raise ValueError(f"counts {tuple(counts.shape)} and scale {tuple(scale.shape)} do not fit {g} experts of {n} rows")
    x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    m = x.shape[0]
    offsets = torch.zeros(g + 1, dtype=torch.int64)
    torch.cumsum(counts.to(torch.int64), 0, out=offsets[1:])
    if int(offsets[-1]) != m:
        raise ValueError(f"counts sum to {int(offsets[-1])}, x has {m} rows")
    scale = scale.float().contiguous()  # bound to a name: a temporary would be freed before the call
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        lib.qk_grouped_linear(x.data_ptr(), m, k, padded(k), eps, packed.data_ptr(), g, n, scale.data_ptr(),
                              offsets.data_ptr(), y.data_ptr())
    return y
