"""`python -m bench.generate`: batch-1 decode tokens/s and prefill tokens/s of the `cpu` preset's
exports (ternary, int8, int4, mixed, FP16-stored) and of the FP32 model, in one run.
Writes bench/results/generate.json.

`--preset gpu`: the seed note's full-size model (the `gpu` preset: 410 M parameters, ~50 M active)
built with seeded random weights (no training needed), as `ternary` (the export's modules),
`fp32` and `bf16` (float linear layers holding the same dequantized weights): decode tokens/s,
512-token prefill tokens/s, and the share of decode time per component (attention, council
experts, micro agents, diffusion refinement, head; the rest is routing, norms and framework).
With `--check` it also takes one training step at full shape (batch 1, 32 tokens) and writes,
reloads and generates from every export variant. Writes bench/results/generate_gpu.json.

"fp32" is models/grpo with its linear layers as float nn.Linear holding the dequantized ternary
weights: the same network computed in FP32 (the `fp16` export computes in FP32 too, from weights
rounded to FP16). For each model the share of decode time spent inside the linear layers is
measured with timing hooks in a separate pass: the rest is per-token framework overhead.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bench.common import write_result
from bench.moe import as_inference
from quillan.checkpoint import load_model_dir
from quillan.config import QuillanConfig
from quillan.export import ExportConfig, convert, load, save
from quillan.export.measure import decode_tokens_per_s, prefill_tokens_per_s
from quillan.model import Attention, DiffusionRefiner, Quillan
from quillan.moe import CouncilFFN, SwiGLU

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


COMPONENTS = ("attention", "council_experts", "micro_agents", "dense_ffn", "diffusion", "head")


@torch.no_grad()
def component_shares(model: Quillan, n_tokens: int, prompt_len: int = 16) -> dict[str, float]:
    """Share of one batch-1 greedy generation's wall time spent in each of COMPONENTS (timing
    hooks on the modules, timed wrappers on the council's grouped experts and micro agents),
    and `other`: the rest (routing, norms, embedding, sampling, Python)."""
    spent = dict.fromkeys(COMPONENTS, 0.0)
    starts: dict[int, float] = {}
    handles, restore = [], []

    def hook(module: nn.Module, part: str) -> None:
        def pre(mod, _inp):
            starts[id(mod)] = time.perf_counter()

        def post(mod, _inp, _out):
            spent[part] += time.perf_counter() - starts.pop(id(mod))
        handles.extend((module.register_forward_pre_hook(pre), module.register_forward_hook(post)))

    def wrap(obj, attr: str, part: str) -> None:
        fn = getattr(obj, attr)

        def call(*args):
            t = time.perf_counter()
            out = fn(*args)
            spent[part] += time.perf_counter() - t
            return out
        setattr(obj, attr, call)
        restore.append((obj, attr, fn))

    for m in model.modules():
        if isinstance(m, Attention):
            hook(m, "attention")
        elif isinstance(m, CouncilFFN):
            if m.grouped_experts is not None:
                wrap(m, "grouped_experts", "council_experts")
            else:
                for e in m.experts:
                    hook(e, "council_experts")
            if m.P:
                wrap(m, "_micro_all", "micro_agents")
        elif isinstance(m, DiffusionRefiner):
            hook(m, "diffusion")
    for block in model.blocks:
        if isinstance(block.ffn, SwiGLU):
            hook(block.ffn, "dense_ffn")
    hook(model.head, "head")
    ids = torch.randint(4, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    try:
        model.generate(ids, 2, temperature=0.0)  # warm-up
        spent.update(dict.fromkeys(COMPONENTS, 0.0))
        t0 = time.perf_counter()
        model.generate(ids, n_tokens, temperature=0.0)
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
        for obj, attr, fn in restore:
            if attr == "_micro_all":
                delattr(obj, attr)  # back to the class's method
            else:
                setattr(obj, attr, fn)
    shares = {k: v / total for k, v in spent.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def gpu_models(seed: int) -> dict[str, nn.Module]:
    """The `gpu` preset with seeded random weights: its ternary export form (also with an INT8
    head), and float linear layers holding the same dequantized weights in FP32 and BF16."""
    torch.manual_seed(seed)
    base = Quillan(QuillanConfig.preset("gpu")).eval()
    fp32 = as_inference(copy.deepcopy(base), "float")
    int8_head = convert(copy.deepcopy(base), "ternary", ExportConfig(int8_head=True))[0]  # bench/head.py: its quality
    ternary = convert(base, "ternary", ExportConfig())[0]
    return {"ternary": ternary, "ternary_int8_head": int8_head, "fp32": fp32,
            "bf16": copy.deepcopy(fp32).to(torch.bfloat16)}


def full_shape_checks(seed: int, n_tokens: int = 4) -> dict:
    """One AdamW training step of the `gpu` preset (batch 1, 32 tokens; seconds and loss), then
    every export variant written, reloaded from disk and generating `n_tokens` greedy tokens."""
    torch.manual_seed(seed)
    model = Quillan(QuillanConfig.preset("gpu"))
    ids = torch.randint(4, model.cfg.vocab_size, (1, 33), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    out = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    (loss + out.aux_loss + out.diffusion_loss).backward()
    opt.step()
    result = {"train_step": {"seconds": time.perf_counter() - t0, "loss": loss.item(),
                             "parameters": model.num_parameters(),
                             "active_parameters": model.num_parameters(active_only=True)}}
    del opt
    model.eval()
    prompt = ids[:, :16]
    result["variants"] = {}
    with tempfile.TemporaryDirectory(prefix="quillan-gpu-export-") as tmp:
        for variant in ExportConfig().variants:
            t0 = time.perf_counter()
            converted, plan = convert(copy.deepcopy(model), variant, ExportConfig())
            meta = save(converted, Path(tmp) / variant, variant, plan, {})
            del converted
            reloaded = load(Path(tmp) / variant)[0]
            tokens = reloaded.generate(prompt, n_tokens, temperature=0.0)[0, 16:].tolist()
            result["variants"][variant] = {"bytes_on_disk": meta["bytes_on_disk"], "generated": tokens,
                                           "seconds": time.perf_counter() - t0}
            print(f"gpu preset: {variant} export written, reloaded, generated {tokens}")
            del reloaded
    return result


def main_gpu(args) -> None:
    results = {}
    for name, model in tqdm(gpu_models(args.seed).items(), desc="bench.generate --preset gpu", unit="model"):
        results[name] = {
            "decode_tokens_per_s": decode_tokens_per_s(model, args.decode_tokens, args.repeats),
            "prefill_tokens_per_s": prefill_tokens_per_s(model, 1, args.prefill_len, args.repeats),
            "decode_share": component_shares(model, args.decode_tokens),
        }
    for name, r in results.items():
        r["decode_vs_fp32"] = r["decode_tokens_per_s"] / results["fp32"]["decode_tokens_per_s"]
        shares = "  ".join(f"{k} {100 * v:.0f}%" for k, v in r["decode_share"].items())
        print(f"{name:8s} decode {r['decode_tokens_per_s']:7.2f} tok/s (×{r['decode_vs_fp32']:.2f} vs fp32)  "
              f"prefill {r['prefill_tokens_per_s']:8.1f} tok/s  | {shares}")
    payload = {"preset": "gpu", "args": {k: str(v) for k, v in vars(args).items()}, "variants": results}
    if args.check:
        payload["full_shape"] = full_shape_checks(args.seed)
    print(f"wrote {write_result('generate_gpu', payload)}")


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
    ap.add_argument("--prefill-len", type=int, default=None, help="default: 64 (cpu), 512 (gpu)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                    help="cpu: the trained exports; gpu: the full-size preset with seeded random weights")
    ap.add_argument("--seed", type=int, default=0, help="--preset gpu: the random weights' seed")
    ap.add_argument("--check", action="store_true",
                    help="--preset gpu: also one training step and every export variant reloaded at full shape")
    args = ap.parse_args(argv)
    if args.prefill_len is None:
        args.prefill_len = 512 if args.preset == "gpu" else 64
    if args.preset == "gpu":
        return main_gpu(args)
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
