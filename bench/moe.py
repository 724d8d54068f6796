"""`python -m bench.moe`: the council layer against a dense SwiGLU with the same active
parameters, for E ∈ {8, 32, 128} experts (top-2), in the exported ternary form (TernaryLinear)
and in float (nn.Linear). Writes bench/results/moe.json.

The council layer here is one mini-MoE (`n_council=1`) without micro agents, so its active
parameters per token are exactly top-k experts: 2 · 3 · D · H, the same as a SwiGLU of hidden 2H.
Its time includes routing (router, softmax, top-k) and dispatch (sort by expert, gather, the
experts' products, index_add back). The ternary form runs the experts as the exports do: all of
them in three grouped kernel calls (`quillan.export.attach_grouped_experts`); the float form
runs one batched product per expert group.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from tqdm import tqdm

from bench.common import write_result
from quillan.bitnet import BitLinear
from quillan.export import attach_grouped_experts
from quillan.export.layers import TernaryLinear
from quillan.moe import CouncilFFN, SwiGLU
from quillan.export.measure import median_seconds


def as_inference(module: nn.Module, form: str) -> nn.Module:
    """Every BitLinear replaced by its ternary TernaryLinear (`ternary`) or a float nn.Linear with
    the same dequantized weights (`float`)."""
    for name, child in list(module.named_children()):
        if isinstance(child, BitLinear):
            if form == "ternary":
                new = TernaryLinear.from_float(child.weight)
            else:
                new = nn.Linear(child.in_features, child.out_features, bias=False)
                new.weight.data = child.ternary_weight().detach()
            setattr(module, name, new)
        else:
            as_inference(child, form)
    attach_grouped_experts(module)
    return module.eval()


@torch.no_grad()
def measure(experts: int, dim: int, hidden: int, tokens: int, top_k: int, form: str) -> dict:
    torch.manual_seed(0)
    council = as_inference(CouncilFFN(dim, 1, 1, experts, top_k, hidden), form)
    dense = as_inference(SwiGLU(dim, top_k * hidden), form)
    x = torch.randn(1, tokens, dim)
    council_ms = 1e3 * median_seconds(lambda: council(x), max_reps=50, budget_s=1.0)
    dense_ms = 1e3 * median_seconds(lambda: dense(x), max_reps=50, budget_s=1.0)
    calls = council.expert_calls
    council(x)
    active = sum(p.numel() for p in dense.parameters()) + sum(b.numel() for b in dense.buffers())
    return {"experts": experts, "top_k": top_k, "form": form, "dim": dim, "expert_hidden": hidden,
            "tokens": tokens, "council_ms": council_ms, "dense_swiglu_ms": dense_ms,
            "ratio_council_over_dense": council_ms / dense_ms,
            "experts_run_per_call": council.expert_calls - calls,
            "dense_hidden": top_k * hidden, "dense_tensor_elements": active}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=512, help="hidden width of one expert")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per call (batch · sequence)")
    ap.add_argument("--top-k", type=int, default=2)
    args = ap.parse_args(argv)
    results = []
    for form in ("ternary", "float"):
        for e in tqdm(args.experts, desc=f"bench.moe ({form})", unit="config"):
            results.append(measure(e, args.dim, args.hidden, args.tokens, args.top_k, form))
    for r in results:
        print(f"{r['form']:7s} E={r['experts']:4d} top-{r['top_k']}: council {r['council_ms']:8.3f} ms  "
              f"dense SwiGLU {r['dense_swiglu_ms']:8.3f} ms  ratio {r['ratio_council_over_dense']:.2f}  "
              f"({r['experts_run_per_call']} experts ran)")
    print(f"wrote {write_result('moe', {'args': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
