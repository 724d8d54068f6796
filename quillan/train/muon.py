"""Muon for the BitLinear projections, AdamW for the rest (`train.optimizer: muon`).

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon) replaces each 2-D weight's momentum by its nearest
semi-orthogonal matrix U Vᵀ, approximated by five Newton–Schulz steps; Liu et al. 2025 ("Muon is
Scalable for LLM Training", arXiv 2502.16982, §2.2) scale that update by 0.2·√max(m, n) so its RMS
matches AdamW's, which lets it reuse AdamW's learning rate and weight decay. Embeddings, the head,
routers, norms and the micro agents' banks keep AdamW, as in both papers.

Same-shape matrices (the council's 64 expert projections of a shape) are orthogonalized in one
batched call: one (E, m, n) product chain instead of E small ones. That, and float32 Newton–Schulz
on CPUs whose bf16 matmuls are slow, is why this is not `torch.optim.Muon` (one 2-D matrix per call,
bf16 inside); tests/train/test_muon.py checks the two agree.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

# The quintic's coefficients (Jordan et al. 2024): maximise the slope at 0 while keeping every
# singular value in roughly [0.7, 1.2] after five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalized(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """(…, m, n) → (…, m, n): each matrix's approximate U Vᵀ (its SVD's singular values → ~1).

    Newton–Schulz quintic X ← aX + (b XXᵀ + c (XXᵀ)²) X on X = G / ‖G‖_F, run on the wide
    orientation (m ≤ n) so that XXᵀ is the smaller Gram matrix."""
    a, b, c = NS_COEFFICIENTS
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def rms_matched_scale(shape: torch.Size) -> float:
    """The update scale that gives an orthogonal (m, n) update AdamW's RMS, 0.2·√max(m, n)
    (Liu et al. 2025, arXiv 2502.16982, eq. 4)."""
    return 0.2 * max(shape[-2], shape[-1]) ** 0.5


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over two kinds of parameter group: groups with `"muon": True` (2-D weights)
    take Muon steps, the rest AdamW (PyTorch's, fused where asked). Both kinds share `lr`, so one
    LR scheduler drives them; state lives in one `self.state`, so checkpoints hold all of it."""

    def __init__(self, muon_params: Iterable[torch.nn.Parameter], adamw_groups: list[dict[str, Any]], lr: float,
                 betas: tuple[float, float], weight_decay: float, momentum: float = 0.95, ns_steps: int = 5,
                 fused: bool = False):
        muon_params = list(muon_params)
        if any(p.dim() != 2 for p in muon_params):
            raise ValueError("Muon takes 2-D weights only; give the others to AdamW")
        groups = [{"params": muon_params, "muon": True, "weight_decay": weight_decay}]
        groups += [{**g, "muon": False} for g in adamw_groups]
        super().__init__(groups, dict(lr=lr, betas=betas, weight_decay=weight_decay, momentum=momentum,
                                      ns_steps=ns_steps))
        self._fused = fused
        self._bind_adamw()

    def _bind_adamw(self) -> None:
        # The inner AdamW steps this optimizer's own group dicts and state, so the scheduler's LR
        # and a loaded checkpoint reach it.
        adamw_groups = [g for g in self.param_groups if not g["muon"]]
        self.adamw = torch.optim.AdamW(adamw_groups, lr=self.defaults["lr"], fused=self._fused)
        self.adamw.param_groups = adamw_groups
        self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._bind_adamw()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        self.adamw.step()
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[torch.Size, list[torch.nn.Parameter]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_shape[p.shape].append(p)
        for shape, params in by_shape.items():
            grads = torch.stack([p.grad for p in params])
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            buf = torch.stack(bufs)
            buf.lerp_(grads, 1 - mu)
            update = orthogonalized(grads.lerp_(buf, mu), group["ns_steps"])  # Nesterov momentum
            scale = rms_matched_scale(shape)
            for i, p in enumerate(params):
                bufs[i].copy_(buf[i])
                p.mul_(1 - lr * wd)
                p.add_(update[i], alpha=-lr * scale)
