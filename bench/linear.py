"""`python -m bench.linear`: TernaryLinear (each kernel path) against nn.Linear FP32 and BF16 on the
same weights, K = N ∈ {1024, 2048, 4096}, M ∈ {1, 8, 64, 256}; median ms, ratios, weight bytes.
Writes bench/results/linear.json.

The `int_mm` path (torch._int_mm) is measured up to K = N = 2048 only: at 4096 one call takes
seconds on a 2-core CPU.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from tqdm import tqdm

from bench.common import write_result
from quillan.bitnet import BitLinear
from quillan.export.layers import TernaryLinear, default_path
from quillan.export.measure import median_seconds

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
    out = []
    for m in rows:
        x = torch.randn(m, k)
        xb = x.bfloat16()
        row = {"K": k, "N": k, "M": m,
               "fp32_ms": 1e3 * median_seconds(lambda: fp32(x), max_reps=50, budget_s=1.0),
               "bf16_ms": 1e3 * median_seconds(lambda: bf16(xb), max_reps=50, budget_s=1.0)}
        for path in paths:
            if path == "int_mm" and k > INT_MM_MAX:
                continue
            row[f"ternary_{path}_ms"] = 1e3 * median_seconds(lambda: tl(x, path=path), min_reps=3, max_reps=50, budget_s=1.0)
            assert torch.equal(tl(x, path=path), tl(x, path="float")), f"{path} differs at M={m}, K={k}"
        best = min((p for p in paths if f"ternary_{p}_ms" in row), key=lambda p: row[f"ternary_{p}_ms"])
        row["fastest_path"] = best
        row["ternary_ms"] = row[f"ternary_{default_path()}_ms"]
        row["speedup_vs_fp32"] = row["fp32_ms"] / row["ternary_ms"]
        row["speedup_vs_bf16"] = row["bf16_ms"] / row["ternary_ms"]
        row["weight_bytes"] = {"ternary_packed": tl.weight_bytes(), "ternary_scale": tl.scale.numel() * 4,
                               "fp32": k * k * 4, "bf16": k * k * 2}
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
              f"×{r['speedup_vs_bf16']:.2f} vs bf16  (fastest path: {r['fastest_path']})")
    path = write_result("linear", {"default_path": default_path(), "paths": list(paths), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
