"""`python -m bench.head`: what an INT8 output head (`quillan.export.layers.Int8Head`: int8
weights, one scale per vocabulary row, int8 activations) gives in speed and costs in quality.

- Speed, at the `gpu` preset's head (vocab 50257 × dim 512, seeded random weights): FP32, BF16 and
  INT8 heads for one token (batch-1 decode) and 512 tokens (prefill), interleaved medians; `int8`
  is the module as it runs (`int8_path`: the native int8-rows loop where the kernels have one: VPDPBUSD, or maddubs on AVX2),
  `int8_int_mm` its `torch._int_mm` fallback on the same weights.
- Quality, on a trained model (`--model`, default models/grpo): answer-token cross-entropy on
  `--val` stratified val records and greedy exact match on `--test` stratified test records, with
  the model's float head and with the INT8 head, and how many greedy answers change.
Writes bench/results/head.json.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import interleaved_medians, write_result
from quillan import kernels
from quillan.bitnet import activation_quantize
from quillan.config import QuillanConfig
from quillan.export.layers import Int8Head

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def speed(seed: int = 0) -> dict:
    cfg = QuillanConfig.preset("gpu")
    w = torch.randn(cfg.vocab_size, cfg.dim, generator=torch.Generator().manual_seed(seed)) * 0.02
    wb, int8 = w.bfloat16(), Int8Head.from_float(w)

    def int8_int_mm(x: torch.Tensor) -> torch.Tensor:  # Int8Head's oneDNN fallback, the same bits
        xq, xs = activation_quantize(x)
        return (torch._int_mm(xq, int8.q.t()).float() * xs) * int8.scale.view(1, -1)

    out = {"int8_path": "native" if kernels.has_int8_rows() else "int_mm"}
    for tokens in (1, 512):
        x = torch.randn(tokens, cfg.dim, generator=torch.Generator().manual_seed(seed + tokens))
        xb = x.bfloat16()
        ms = interleaved_medians({"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb),
                                  "int8": lambda: int8(x), "int8_int_mm": lambda: int8_int_mm(x)})
        assert torch.equal(int8(x), int8_int_mm(x)), "the int8 head's paths differ"
        out[f"tokens_{tokens}"] = {**{f"{k}_ms": v for k, v in ms.items()},
                                   "int8_speedup_vs_fp32": ms["fp32"] / ms["int8"],
                                   "int8_speedup_vs_bf16": ms["bf16"] / ms["int8"]}
    out["weight_bytes"] = {"fp32": w.numel() * 4, "bf16": w.numel() * 2, "int8": w.numel() + cfg.vocab_size * 4}
    return out


@torch.no_grad()
def quality(model_dir: Path, n_val: int, n_test: int, max_new_tokens: int) -> dict:
    from quillan.checkpoint import load_model_dir
    from quillan.data.splits import stratified_sample
    from quillan.inference import accuracy_by_domain
    from quillan.train.data import TokenizedRecords
    from quillan.train.evaluate import evaluate_loss
    from tasks.common import read_jsonl

    model, tok = load_model_dir(model_dir)
    model.eval()
    int8 = copy.deepcopy(model)
    int8.head = Int8Head.from_float(model.head.weight)
    val = TokenizedRecords(stratified_sample(read_jsonl(ROOT / "data/generated/val.jsonl"), n_val, 1), tok,
                           model.cfg.max_seq_len, digit_order=model.cfg.digit_order)
    test = stratified_sample(read_jsonl(ROOT / "data/generated/test.jsonl"), n_test, 1)
    out = {"model": str(model_dir), "val_records": len(val), "test_records": len(test)}
    for name, m in (("float", model), ("int8", int8)):
        acc = accuracy_by_domain(m, tok, test, max_new_tokens)
        out[name] = {"val_loss": evaluate_loss(m, val)["loss"], "accuracy": acc["accuracy"],
                     "outcomes": acc["outcomes"]}
    changed = sum(a != b for a, b in zip(out["float"].pop("outcomes"), out["int8"].pop("outcomes")))
    out["answers_changed_correctness"] = changed
    out["val_loss_delta"] = out["int8"]["val_loss"] - out["float"]["val_loss"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "grpo")
    ap.add_argument("--val", type=int, default=512)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    result = {"speed_gpu_head": speed()}
    for k, r in result["speed_gpu_head"].items():
        if k.startswith("tokens_"):
            print(f"head {k}: fp32 {r['fp32_ms']:.3f} ms  bf16 {r['bf16_ms']:.3f} ms  int8 {r['int8_ms']:.3f} ms  "
                  f"(int_mm {r['int8_int_mm_ms']:.3f} ms)  "
                  f"(×{r['int8_speedup_vs_fp32']:.2f} vs fp32)")
    if (args.model / "model.safetensors").exists():
        q = result["quality"] = quality(args.model, args.val, args.test, args.max_new_tokens)
        print(f"quality on {q['model']}: val loss {q['float']['val_loss']:.4f} → {q['int8']['val_loss']:.4f} "
              f"(Δ {q['val_loss_delta']:+.4f} nats), accuracy {q['float']['accuracy']:.3f} → "
              f"{q['int8']['accuracy']:.3f} on {q['test_records']} test records "
              f"({q['answers_changed_correctness']} answers changed correctness)")
    else:
        print(f"no model at {args.model}: speed only (run the pipeline for the quality half)")
    print(f"wrote {write_result('head', {'args': {k: str(v) for k, v in vars(args).items()}, **result})}")


if __name__ == "__main__":
    main()
