"""The council feed-forward: an overseer routing over mini-MoEs, each with top-2 SwiGLU experts
and a bank of micro agents (seed notes 000 and 001).

Shapes: tokens are flattened to N = B·T rows of width D. The overseer gives α (N, M) over M
council members and keeps the top `council_top_k`; member m's router gives β (N, E) over its
experts and keeps the top `expert_top_k`. A token's output is
    Σ_{m ∈ top(α)} α'_m · ( Σ_{e ∈ top(β_m)} β'_{m,e} · expert_{m,e}(x) + micro_m(x) )
with α', β' renormalised over the kept entries. Only selected experts run: assignments are
sorted by expert and each expert runs once on its group of tokens; where every expert is a plain
BitLinear SwiGLU, all of them run as three grouped matmuls over the sorted rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from quillan.bitnet import BitLinear, binary_weight, has_forward_hooks, on_shared_input, stacked_effective_weight


def load_balancing_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4-6), scaled by num_experts.

    probs (N, E) router softmax, topk_idx (N, k) chosen experts. `E · Σ_i f_i · P_i` where
    f_i is the share of assignments to expert i and P_i its mean probability; 1.0 when uniform.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(0, topk_idx.reshape(-1), torch.ones_like(topk_idx.reshape(-1), dtype=probs.dtype))
    f = counts / topk_idx.numel()
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean of logsumexp(logits)^2."""
    if logits.numel() == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def _bank_tensor(bank) -> torch.Tensor:
    """A micro-agent bank (M, P, d) as a float tensor: a Parameter, or an inference module of
    the exports with `dequantized()` (int8 rows)."""
    return bank if isinstance(bank, torch.Tensor) else bank.dequantized()


def _bank_rows(bank, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (any shape, indices into the flattened (M·P) agents) of a bank (M, P, d):
    (*rows.shape, d). Only these rows are read (and, for int8 banks, dequantized)."""
    if isinstance(bank, torch.Tensor):
        return F.embedding(rows, bank.reshape(-1, bank.shape[-1]))
    return bank.rows(rows)


def _topk_renorm(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = probs.topk(k, dim=-1)
    return vals / vals.sum(dim=-1, keepdim=True).clamp(min=1e-9), idx


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020) of BitLinear layers: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, **bitlinear_kw):
        super().__init__()
        self.w1 = BitLinear(dim, hidden, **bitlinear_kw)
        self.w3 = BitLinear(dim, hidden, **bitlinear_kw)
        self.w2 = BitLinear(hidden, dim, **bitlinear_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = on_shared_input((self.w1, self.w3), x)
        return self.w2(F.silu(gate) * up)


def stackable(experts: list[SwiGLU], x: torch.Tensor) -> bool:
    """Whether `grouped_swiglu` computes these experts: every one a SwiGLU of plain absmean
    BitLinears configured alike, with no forward hooks (calibration reads inputs through
    them), on float32 input outside autocast. Exports' inference layers, tequila's per-layer
    bias and other dtypes take the per-expert loop."""
    if x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
        return False
    keys = set()
    for e in experts:
        if type(e) is not SwiGLU or has_forward_hooks(e):
            return False
        for m in (e.w1, e.w3, e.w2):
            if type(m) is not BitLinear or m.method != "absmean" or m.bias is not None or has_forward_hooks(m):
                return False
            keys.add((m.lam, m.training, m.quantize, m.act_quant, m.per_channel))
    return len(keys) == 1


def grouped_swiglu(experts: list[SwiGLU], x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Every expert on its own rows of x (A, D), rows sorted by expert with counts[g] rows for
    expert g (G,): (A, D), the values of calling each expert on its rows (to float rounding:
    SiLU's vector and scalar tails differ in the last bit, and which rows land in a tail depends
    on the group sizes; tests/test_moe.py compares values and gradients). Three grouped
    matmuls over stacked effective weights instead of 3·G matmuls and 3·G weight quantizations
    (a training step's MoE dispatch was a loop of 16 experts per layer). The activation
    fake-quant is per row, so quantizing the sorted rows once equals each expert's own."""
    offs = counts.cumsum(0).to(torch.int32)
    first = experts[0]  # every layer is configured alike (`stackable`): its input quantization is theirs

    def stacked(name: str) -> torch.Tensor:  # (G, in, out): grouped_mm multiplies x @ w
        return stacked_effective_weight([getattr(e, name) for e in experts]).transpose(1, 2)

    xq = first.w1.quantized_input(x)
    h = F.silu(F.grouped_mm(xq, stacked("w1"), offs=offs)) * F.grouped_mm(xq, stacked("w3"), offs=offs)
    return F.grouped_mm(first.w2.quantized_input(h), stacked("w2"), offs=offs)


@dataclass
class CouncilStats:
    """What one council layer reports for losses and logging."""

    council_probs: torch.Tensor   # (N, M) overseer α, for the CCRL entropy bonus
    aux_loss: torch.Tensor        # load balancing, overseer + mean over members (0 without autograd)
    z_loss: torch.Tensor          # router z-loss, overseer + member routers (0 without autograd)
    expert_counts: torch.Tensor   # (M, E) token assignments per expert in this call


class Routing(NamedTuple):
    """One council layer's routing of N flat tokens (kc kept members, ke experts per member)."""
    overseer_logits: torch.Tensor  # (N, M)
    alpha: torch.Tensor            # (N, M) overseer probabilities (the CCRL entropy bonus reads them)
    member_weights: torch.Tensor   # (N, kc) renormalised α of the kept members
    members: torch.Tensor          # (N, kc) kept member indices
    expert_logits: torch.Tensor    # (N, kc, E) router logits of the kept members
    beta: torch.Tensor             # (N, kc, E) expert probabilities
    expert_weights: torch.Tensor   # (N, kc, ke) renormalised β of the chosen experts
    experts: torch.Tensor          # (N, kc, ke) chosen expert indices within each member


class CouncilFFN(nn.Module):
    """Overseer → M mini-MoEs (E SwiGLU experts, top-k) + P micro agents per member (PEER-style)."""

    # False: always gather the chosen agents' rows, PEER as written (bench.train_step's old step).
    dense_agents = True
    # False: one call per expert even where `grouped_swiglu` could run them all (the old step).
    grouped = True

    def __init__(self, dim: int, n_council: int, council_top_k: int, n_experts: int, expert_top_k: int,
                 expert_hidden: int, n_micro: int = 0, micro_top_k: int = 0, micro_key_dim: int = 32,
                 binary_agents: bool = False, **bitlinear_kw):
        super().__init__()
        self.M, self.kc, self.E, self.ke = n_council, council_top_k, n_experts, expert_top_k
        self.P, self.kp = n_micro, micro_top_k
        # Routers stay in full precision (seed note 000: "Overseer FP16").
        self.overseer = nn.Linear(dim, n_council, bias=False)
        self.routers = nn.Linear(dim, n_council * n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, expert_hidden, **bitlinear_kw)
                                     for _ in range(n_council * n_experts))
        if n_micro > 0:
            # PEER (He 2024, "Mixture of A Million Experts"): single-neuron experts u_i, v_i
            # retrieved by query-key scores; only the top-k rows of u and v are gathered.
            self.micro_query = BitLinear(dim, n_council * micro_key_dim, **bitlinear_kw)
            self.micro_keys = nn.Parameter(torch.randn(n_council, n_micro, micro_key_dim) / micro_key_dim**0.5)
            self.micro_down = nn.Parameter(torch.randn(n_council, n_micro, dim) / dim**0.5)
            self.micro_up = nn.Parameter(torch.zeros(n_council, n_micro, dim))
            self.key_dim = micro_key_dim
        # quant.plan adaptive (seed note 001): the agents' banks (micro_down, micro_up) are binary,
        # ±mean|row| per agent, with the same λ warmup as the ternary layers (set_lambda sets lam).
        self.binary_weights = binary_agents and n_micro > 0
        self.lam = 1.0
        self.expert_calls = 0  # how many expert forward calls ran (tests count dispatch)
        # Inference only, set by quillan.export for native ternary experts: every expert in one
        # grouped call, (x (A, D) sorted by expert, counts (M·E,)) → (A, D).
        self.grouped_experts = None

    def route(self, xs: torch.Tensor) -> "Routing":
        """Routing for flat tokens xs (N, D): overseer probs/logits, kept members, expert picks."""
        ov_logits = self.overseer(xs)                                   # (N, M)
        alpha = ov_logits.float().softmax(dim=-1).to(xs.dtype)
        a_w, a_idx = _topk_renorm(alpha, self.kc)                       # (N, kc)
        r_logits = self.routers(xs).view(-1, self.M, self.E)            # (N, M, E)
        sel_logits = r_logits.gather(1, a_idx[..., None].expand(-1, -1, self.E))  # (N, kc, E)
        beta = sel_logits.float().softmax(dim=-1).to(xs.dtype)
        b_w, b_idx = _topk_renorm(beta, self.ke)                        # (N, kc, ke)
        return Routing(ov_logits, alpha, a_w, a_idx, sel_logits, beta, b_w, b_idx)

    def _agents(self, rows: torch.Tensor) -> torch.Tensor:
        """Gathered bank rows (..., D) as the agents use them: binary per row under the adaptive
        plan (each row is one agent, so binarizing after the gather equals binarizing the bank)."""
        return binary_weight(rows, self.lam, self.training) if self.binary_weights else rows

    def _micro_all(self, xs: torch.Tensor, a_w: torch.Tensor, a_idx: torch.Tensor) -> torch.Tensor:
        """Σ over each token's kept members m of α'_m · micro_m(x), for all tokens xs (N, D) at once.

        One query projection for all members; scores against every member's keys (N, M, P) and
        the kept members' top-k agents with softmax gates g. Then, per PEER (He 2024), only the
        chosen agents' bank rows are gathered, (N, kc, kp, D) each for u and v, when that is
        fewer rows than the banks hold; otherwise (training batches: N·kc·kp ≥ M·P) every agent
        runs densely and the unchosen ones get weight 0: two (N, M·P) products instead of two
        gathers and their scatter-add backward, the same sum with far less memory traffic.
        """
        N = xs.shape[0]
        q = self.micro_query(xs).view(N, self.M, self.key_dim)                       # (N, M, dk)
        if N * self.kc < self.M:
            # Few tokens (decoding): score only the kept members' keys, not all M members' (at the
            # gpu preset's decode, 2 of 32: the (32, 1, 64) × (32, 64, 325) product was 160 µs a layer).
            q = q.gather(1, a_idx[..., None].expand(-1, -1, self.key_dim))          # (N, kc, dk)
            member_rows = a_idx[..., None] * self.P + torch.arange(self.P, device=xs.device)
            scores = torch.einsum("ncd,ncpd->ncp", q, _bank_rows(self.micro_keys, member_rows))  # (N, kc, P)
        else:
            scores = torch.einsum("nmd,mpd->nmp", q, _bank_tensor(self.micro_keys))   # (N, M, P)
            scores = scores.gather(1, a_idx[..., None].expand(-1, -1, self.P))       # (N, kc, P)
        s, idx = scores.topk(self.kp, dim=-1)                                        # (N, kc, kp)
        g = s.float().softmax(dim=-1).to(xs.dtype) * a_w[..., None]                  # α'_m · g
        rows = a_idx[..., None] * self.P + idx                                       # rows of the (M·P, D) banks
        if not self.dense_agents or rows.numel() < self.M * self.P:
            u = self._agents(_bank_rows(self.micro_down, rows))                      # (N, kc, kp, D)
            v = self._agents(_bank_rows(self.micro_up, rows))
            h = F.gelu(torch.einsum("nd,nckd->nck", xs, u)) * g
            return torch.einsum("nck,nckd->nd", h, v)
        d = xs.shape[-1]
        u = self._agents(_bank_tensor(self.micro_down)).reshape(-1, d)              # (M·P, D)
        v = self._agents(_bank_tensor(self.micro_up)).reshape(-1, d)
        weights = xs.new_zeros(N, self.M * self.P).scatter_add_(1, rows.reshape(N, -1), g.reshape(N, -1))
        return (F.gelu(xs @ u.T) * weights) @ v

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, CouncilStats]:
        shape = x.shape
        xs = x.reshape(-1, shape[-1])
        N = xs.shape[0]
        r = self.route(xs)
        alpha, a_w, a_idx, beta, b_w, b_idx = r.alpha, r.member_weights, r.members, r.beta, r.expert_weights, r.experts
        out = torch.zeros_like(xs)
        # Expert dispatch: one flat list of (token, global expert, weight) assignments.
        weights = (a_w[..., None] * b_w).reshape(-1)                          # (N·kc·ke,)
        experts = (a_idx[..., None] * self.E + b_idx).reshape(-1)
        tokens = torch.arange(N, device=x.device).repeat_interleave(self.kc * self.ke)
        order = experts.argsort(stable=True)
        experts, tokens, weights = experts[order], tokens[order], weights[order]
        counts = torch.bincount(experts, minlength=self.M * self.E)
        run_all = self.grouped_experts
        active = int((counts > 0).sum())
        # Grouped quantizes every expert's weights: it pays when most experts have rows (training,
        # batched decoding; 1.6x at 64 sequences), not at batch 1 (2x slower, 4 of 16 used).
        experts = list(self.experts)
        if run_all is None and self.grouped and 2 * active >= counts.numel() and stackable(experts, xs):
            run_all = lambda rows, c: grouped_swiglu(experts, rows, c)  # noqa: E731
        if run_all is not None:
            self.expert_calls += active
            out.index_add_(0, tokens, run_all(xs.index_select(0, tokens), counts) * weights[:, None])
        else:
            for e, (tok, w) in enumerate(zip(tokens.split(counts.tolist()), weights.split(counts.tolist()))):
                if tok.numel() == 0:
                    continue
                self.expert_calls += 1
                # index_select, not xs[tok]: its backward is index_add, not a sorting index_put.
                out.index_add_(0, tok, self.experts[e](xs.index_select(0, tok)) * w[:, None])
        if self.P > 0:
            out = out + self._micro_all(xs, a_w, a_idx)
        # Per-member load balancing. Without autograd nothing optimises the auxiliary losses:
        # inference skips them (they read 0).
        losses = torch.is_grad_enabled()
        member_lb = []
        for m in range(self.M if losses else 0):
            rows, slot = (a_idx == m).nonzero(as_tuple=True)                  # (token, kept slot) of member m
            if rows.numel() == 0:
                continue
            flat = rows * self.kc + slot  # row of the (N·kc, ...) views
            member_lb.append(load_balancing_loss(beta.reshape(-1, self.E).index_select(0, flat),
                                                 b_idx.reshape(-1, self.ke)[flat], self.E))
        zero = xs.new_zeros(())
        aux = load_balancing_loss(alpha, a_idx, self.M) if losses else zero
        if member_lb:
            aux = aux + torch.stack(member_lb).mean()
        z = router_z_loss(r.overseer_logits) + router_z_loss(r.expert_logits) if losses else zero
        stats = CouncilStats(council_probs=alpha, aux_loss=aux, z_loss=z,
                             expert_counts=counts.view(self.M, self.E).detach())
        return out.view(shape), stats
