"""`python -m bench.generate`: batch-1 decode tokens/s and prefill tokens/s of the `cpu` preset's
exports (ternary, int8, int4, mixed, FP16-stored) and of the FP32 model, in one run.
Writes bench/results/generate.json.

"fp32" is models/grpo with its linear layers as float nn.Linear holding the dequantized ternary
weights: the same network computed in FP32 (the `fp16` export computes in FP32 too, from weights
rounded to FP16). For each model the share of decode time spent inside the linear layers is
measured with timing hooks in a separate pass: the rest is per-token framework overhead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bench.common import write_result
from bench.moe import as_inference
from quillan.checkpoint import load_model_dir
from quillan.export import load
from quillan.export.measure import decode_tokens_per_s, prefill_tokens_per_s

ROOT = Path(__file__).resolve().parent.parent


def linear_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ in
            ("TernaryLinear", "Linear8bitLt", "Linear4bit")]


@torch.no_grad()
def linear_share(model: nn.Module, n_tokens: int) -> float:
    """Share of one batch-1 generation's wall time spent inside the linear layers (and the
    grouped expert kernels of ternary council layers, which replace the experts' linear calls)."""
    spent = [0.0]
    starts: dict[int, float] = {}

    def pre(mod, _inp):
        starts[id(mod)] = time.perf_counter()

    def post(mod, _inp, _out):
        spent[0] += time.perf_counter() - starts.pop(id(mod))

    def timed(fn):
        def call(*args):
            t = time.perf_counter()
            out = fn(*args)
            spent[0] += time.perf_counter() - t
            return out
        return call

    handles = [h for m in linear_modules(model) for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    grouped = [(m, m.grouped_experts) for m in model.modules() if getattr(m, "grouped_experts", None) is not None]
    for m, fn in grouped:
        m.grouped_experts = timed(fn)
    ids = torch.randint(4, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    model.generate(ids, 2, temperature=0.0)  # warm-up
    t0 = time.perf_counter()
    model.generate(ids, n_tokens, temperature=0.0)
    total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    for m, fn in grouped:
        m.grouped_experts = fn
    return spent[0] / total


def models(export_dir: Path, grpo_dir: Path) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for variant in ("ternary", "int8", "int4", "mixed", "fp16"):
        if (export_dir / variant / "metadata.json").exists():
            out[variant] = load(export_dir / variant)[0]
    if (grpo_dir / "model.safetensors").exists():
        out["fp32"] = as_inference(load_model_dir(grpo_dir)[0], "float")
    if not out:
        raise SystemExit(f"no exports under {export_dir} and no model in {grpo_dir}: run `quillan run` first")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exports", type=Path, default=ROOT / "models" / "export")
    ap.add_argument("--grpo", type=Path, default=ROOT / "models" / "grpo")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    results = {}
    for name, model in tqdm(models(args.exports, args.grpo).items(), desc="bench.generate", unit="model"):
        results[name] = {
            "decode_tokens_per_s": decode_tokens_per_s(model, args.decode_tokens, args.repeats),
            "prefill_tokens_per_s": prefill_tokens_per_s(model, args.prefill_batch, args.prefill_len, args.repeats),
            "decode_share_in_linear_layers": linear_share(model, args.decode_tokens),
        }
    fp32 = results.get("fp32", {}).get("decode_tokens_per_s")
    for name, r in results.items():
        if fp32:
            r["decode_vs_fp32"] = r["decode_tokens_per_s"] / fp32
        print(f"{name:8s} decode {r['decode_tokens_per_s']:8.1f} tok/s  prefill {r['prefill_tokens_per_s']:9.1f} tok/s"
              f"  linear layers {100 * r['decode_share_in_linear_layers']:5.1f} % of decode"
              + (f"  ×{r['decode_vs_fp32']:.2f} vs fp32" if fp32 else ""))
    print(f"wrote {write_result('generate', {'args': {k: str(v) for k, v in vars(args).items()}, 'results': results})}")


if __name__ == "__main__":
    main()
