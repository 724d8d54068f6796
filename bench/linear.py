"""`python -m bench.linear`: TernaryLinear (each kernel path) against nn.Linear FP32 and BF16 on the
same weights, K = N ∈ {1024, 2048, 4096}, M ∈ {1, 8, 64, 256}; median ms, ratios, weight bytes.
Writes bench/results/linear.json with the native kernel's instruction path (`kernel_path`).

Rows:
- `ternary_<path>_ms`: TernaryLinear's paths. `ternary_int_mm_ms` unpacks the 2-bit codes to a
  transposed int8 copy on every call before `torch._int_mm`: it measures that copy, not the GEMM
  (up to K = N = 2048 only: at 4096 one call takes seconds on 2 cores).
- `int8_held_ms`: the int8 ceiling, a layer that **holds 8-bit weights** (4× the ternary bytes):
  per-token int8 activations (the same quantization), `torch._int_mm` (oneDNN's int8 GEMM: VNNI
  or AMX where the CPU has them) on the weights already in memory, and the rescale.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from tqdm import tqdm

from bench.common import interleaved_medians, write_result
from quillan import kernels
from quillan.bitnet import BitLinear, activation_quantize
from quillan.export.layers import TernaryLinear, default_path

SIZES, ROWS = (1024, 2048, 4096), (1, 8, 64, 256)
INT_MM_MAX = 2048


@torch.no_grad()
def measure(k: int, rows: tuple[int, ...], paths: tuple[str, ...]) -> list[dict]:
    torch.manual_seed(0)
    bl = BitLinear(k, k).eval()
    tl = TernaryLinear.from_float(bl.weight)
    fp32 = nn.Linear(k, k, bias=False)
    fp32.weight.copy_(bl.ternary_weight())  # the same (dequantized) weights
    bf16 = nn.Linear(k, k, bias=False).to(torch.bfloat16)
    bf16.weight.copy_(fp32.weight)
    q_held = tl.ternary().t().contiguous()  # (K, N) int8, held between calls
    w_scale = tl.scale

    def int8_held(x: torch.Tensor) -> torch.Tensor:
        xq, xs = activation_quantize(x)
        return (torch._int_mm(xq, q_held).float() * xs) * w_scale

    out = []
    for m in rows:
        x = torch.randn(m, k)
        xb = x.bfloat16()
        fns = {"fp32": lambda: fp32(x), "bf16": lambda: bf16(xb), "int8_held": lambda: int8_held(x)}
        for path in paths:
            if not (path == "int_mm" and k > INT_MM_MAX):
                fns[f"ternary_{path}"] = lambda path=path: tl(x, path=path)
        row = {"K": k, "N": k, "M": m, **{f"{name}_ms": ms for name, ms in interleaved_medians(fns).items()}}
        for path in paths:
            if f"ternary_{path}_ms" in row:
                assert torch.equal(tl(x, path=path), tl(x, path="float")), f"{path} differs at M={m}, K={k}"
        assert torch.equal(int8_held(x), tl(x, path="float")), f"int8_held differs at M={m}, K={k}"
        best = min((p for p in paths if f"ternary_{p}_ms" in row), key=lambda p: row[f"ternary_{p}_ms"])
        row["fastest_path"] = best
        row["ternary_ms"] = row[f"ternary_{default_path()}_ms"]
        row["speedup_vs_fp32"] = row["fp32_ms"] / row["ternary_ms"]
        row["speedup_vs_bf16"] = row["bf16_ms"] / row["ternary_ms"]
        row["speedup_vs_int8_held"] = row["int8_held_ms"] / row["ternary_ms"]
        row["weight_bytes"] = {"ternary_packed": tl.weight_bytes(), "ternary_scale": tl.scale.numel() * 4,
                               "fp32": k * k * 4, "bf16": k * k * 2, "int8_held": k * k}
        row["weight_memory_vs_fp32"] = tl.weight_bytes() / (k * k * 4)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    args = ap.parse_args(argv)
    paths = TernaryLinear.PATHS if default_path() == "native" else ("float", "int_mm")
    results = []
    for k in tqdm(args.sizes, desc="bench.linear", unit="size"):
        results += measure(k, tuple(args.rows), paths)
    for r in results:
        print(f"K=N={r['K']:5d} M={r['M']:4d}  fp32 {r['fp32_ms']:8.3f} ms  bf16 {r['bf16_ms']:8.3f} ms  "
              f"ternary {r['ternary_ms']:8.3f} ms  ×{r['speedup_vs_fp32']:.2f} vs fp32  "
              f"×{r['speedup_vs_bf16']:.2f} vs bf16  ×{r['speedup_vs_int8_held']:.2f} vs int8 held "
              f"({r['int8_held_ms']:.3f} ms)  (fastest path: {r['fastest_path']})")
    path = write_result("linear", {"default_path": default_path(), "kernel_path": kernels.path(), "paths": list(paths),
                                   "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
