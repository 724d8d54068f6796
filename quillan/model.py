"""Quillan: a decoder-only BitNet b1.58 transformer with a council MoE feed-forward,
diffusion refinement of the hidden states, early exit, and a KV-cache `generate`.

Shapes: B batch, T tokens, D = dim, H query heads, K key/value heads, hd = D / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from quillan.bitnet import BitLinear, on_shared_input
from quillan.config import QuillanConfig
from quillan.moe import CouncilFFN, CouncilStats, SwiGLU


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), full precision."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(max_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim // 2) (RoFormer, Su et al. 2021, eq. 34)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]); x (B, heads, T, hd), cos/sin (B, 1, T, hd/2)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class KVCache:
    """Preallocated keys/values per layer: (B, K, S, hd); slots [0, filled) are written."""

    def __init__(self, cfg: QuillanConfig, batch: int, length: int, device, dtype):
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = length


class Attention(nn.Module):
    def __init__(self, cfg: QuillanConfig, **bl):
        super().__init__()
        self.H, self.K, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = BitLinear(cfg.dim, self.H * self.hd, **bl)
        self.k_proj = BitLinear(cfg.dim, self.K * self.hd, **bl)
        self.v_proj = BitLinear(cfg.dim, self.K * self.hd, **bl)
        self.o_proj = BitLinear(self.H * self.hd, cfg.dim, **bl)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (B, K, T, hd) for x (B, T, D)."""
        return self._heads_kv(self.k_proj(x), self.v_proj(x), cos, sin)

    def _heads_kv(self, k: torch.Tensor, v: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values (B, T, K·hd) → rotated keys and values (B, K, T, hd)."""
        B, T, _ = k.shape
        k = k.view(B, T, self.K, self.hd).transpose(1, 2)
        return apply_rope(k, cos, sin), v.view(B, T, self.K, self.hd).transpose(1, 2)

    def forward(self, x, cos, sin, mask, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                slot: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, S) bool, True = may attend. With a cache, the new keys
        go to slots [slot, slot + T) of cache rows `rows` (all rows if None) and attention
        reads slots [0, slot + T)."""
        B, T, _ = x.shape
        q, k, v = on_shared_input((self.q_proj, self.k_proj, self.v_proj), x)
        q = apply_rope(q.view(B, T, self.H, self.hd).transpose(1, 2), cos, sin)
        k, v = self._heads_kv(k, v, cos, sin)
        if cache is not None:
            ck, cv = cache
            idx = slice(None) if rows is None else rows
            ck[idx, :, slot : slot + T] = k
            cv[idx, :, slot : slot + T] = v
            k, v = ck[idx, :, : slot + T], cv[idx, :, : slot + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.H != self.K)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.hd))


class Block(nn.Module):
    def __init__(self, cfg: QuillanConfig, council: bool, **bl):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, **bl)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.council = council
        if council:
            self.ffn = CouncilFFN(cfg.dim, cfg.n_council, cfg.council_top_k, cfg.n_experts, cfg.expert_top_k,
                                  cfg.expert_hidden, cfg.n_micro, cfg.micro_top_k, cfg.micro_key_dim,
                                  binary_agents=cfg.quantize and cfg.quant_plan == "adaptive", **bl)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.dense_hidden, **bl)

    def forward(self, x, cos, sin, mask, cache=None, slot=0, rows=None) -> tuple[torch.Tensor, CouncilStats | None]:
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache, slot, rows)
        if self.council:
            y, stats = self.ffn(self.norm2(x))
            return x + y, stats
        return x + self.ffn(self.norm2(x)), None


def cosine_alpha_bar(t: torch.Tensor, steps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ(t) of the cosine noise schedule (Nichol & Dhariwal 2021, eq. 17), t in [0, steps]."""
    f = torch.cos(((t.float() / steps) + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


class DiffusionRefiner(nn.Module):
    """A weight-shared BitNet denoiser applied `steps` times to the hidden states (seed note 000).

    denoise(h, t) = h + SwiGLU(RMSNorm(h) + emb[t]); refine runs t = steps-1 … 0. Its auxiliary
    loss reconstructs clean hidden states h0 from h_t = √ᾱ_t·h0 + √(1−ᾱ_t)·ε.
    """

    def __init__(self, cfg: QuillanConfig, **bl):
        super().__init__()
        self.steps = cfg.diffusion_steps
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.step_emb = nn.Embedding(cfg.diffusion_steps, cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.diffusion_hidden, **bl)
        nn.init.zeros_(self.step_emb.weight)

    def denoise(self, h: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        emb = self.step_emb(torch.as_tensor(t, device=h.device))
        if emb.dim() == 2:  # per-row steps (B,) → (B, 1, D)
            emb = emb[:, None, :]
        return h + self.mlp(self.norm(h) + emb)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for t in reversed(range(self.steps)):
            h = self.denoise(h, t)
        return h

    def denoising_loss(self, h0: torch.Tensor) -> torch.Tensor:
        """MSE between denoise(h_t, t) and the clean h0 (detached), t uniform per sequence."""
        h0 = h0.detach()
        t = torch.randint(0, self.steps, (h0.shape[0],), device=h0.device)
        ab = cosine_alpha_bar(t + 1, self.steps).to(h0.dtype)[:, None, None]
        noisy = ab.sqrt() * h0 + (1 - ab).sqrt() * torch.randn_like(h0)
        return F.mse_loss(self.denoise(noisy, t), h0)


@dataclass
class QuillanOutput:
    logits: torch.Tensor                           # (B, T, V)
    aux_loss: torch.Tensor                         # MoE load balancing, summed over council layers
    z_loss: torch.Tensor                           # router z-loss, summed over council layers
    diffusion_loss: torch.Tensor                   # denoising loss (0 without diffusion / in eval)
    council_probs: list[torch.Tensor] = field(default_factory=list)  # per council layer (B, T, M)
    expert_counts: list[torch.Tensor] = field(default_factory=list)  # per council layer (M, E)


def derived_buffers(cfg: QuillanConfig) -> dict[str, torch.Tensor]:
    """The tensors a model computes from its config and never stores: the RoPE tables and, with
    digit embeddings, the (vocab_size,) bool table of digit tokens."""
    cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
    out = {"rope_cos": cos, "rope_sin": sin}
    if cfg.digit_positions:
        out["digit_lut"] = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        out["digit_lut"][list(cfg.digit_ids)] = True
    return out


class Quillan(nn.Module):
    def __init__(self, cfg: QuillanConfig):
        super().__init__()
        self.cfg = cfg
        bl = dict(per_channel=cfg.per_channel, act_quant=cfg.act_quant, quantize=cfg.quantize,
                  method=cfg.quant_method, tequila_lambda=cfg.tequila_lambda, bias=cfg.linear_bias)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, cfg.has_council(i), **bl) for i in range(cfg.n_layers))
        self.diffusion = DiffusionRefiner(cfg, **bl) if cfg.diffusion_steps > 0 else None
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init)
        self.digit_embed = None
        if cfg.digit_positions:  # row 0: not a digit (stays zero)
            self.digit_embed = nn.Embedding(cfg.digit_positions + 1, cfg.dim, padding_idx=0)
            nn.init.normal_(self.digit_embed.weight, std=0.02)
            with torch.no_grad():
                self.digit_embed.weight[0].zero_()
        for name, t in derived_buffers(cfg).items():
            self.register_buffer(name, t, persistent=False)
        self.block_evals = 0       # (token, block) evaluations in the last generate()
        self.block_evals_saved = 0  # ... skipped by early exit

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and m.weight.shape[0] > 64:
            nn.init.normal_(m.weight, std=0.02)

    # -- helpers -----------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.cfg.max_seq_len}")
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    @staticmethod
    def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """Left-padding-aware positions: the first real token of each row is position 0."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @staticmethod
    def _mask(key_mask: torch.Tensor, q_len: int, offset: int) -> torch.Tensor:
        """(B, 1, q_len, S) bool: causal over slots (query i sits at slot offset+i) and key padding."""
        S = key_mask.shape[1]
        q_slots = torch.arange(offset, offset + q_len, device=key_mask.device)[:, None]
        causal = torch.arange(S, device=key_mask.device)[None, :] <= q_slots
        m = causal[None, None] & key_mask[:, None, None, :].bool()
        # A fully masked row (a padding query) would give NaN in SDPA: let it see itself.
        eye = torch.zeros_like(m)
        eye[..., torch.arange(q_len), torch.arange(offset, offset + q_len)] = True
        return m | (eye & ~m.any(-1, keepdim=True))

    def digit_index(self, ids: torch.Tensor, run: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) long: k for the k-th digit of its run of digit tokens (1-based, clipped to
        `digit_positions`), 0 for every other token; causal, so a token's index never depends on
        what follows. `run` (B,): the index of the token just before ids[:, 0] (cached decoding)."""
        is_digit = self.digit_lut[ids]
        count = is_digit.long().cumsum(-1)
        if run is not None:
            count = count + run[:, None]
        base = torch.where(is_digit, torch.zeros_like(count), count).cummax(-1).values
        return (count - base).clamp(max=self.cfg.digit_positions)

    def embed_tokens(self, ids: torch.Tensor, digits: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, dim), plus the Abacus digit-index embedding (McLeish et al.
        2024, arXiv 2405.17399, §3.1) when `digit_positions` > 0; `digits` from `digit_index`."""
        h = self.embed(ids)
        if self.digit_embed is not None:
            h = h + self.digit_embed(self.digit_index(ids) if digits is None else digits)
        return h

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    # -- training / scoring forward --------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> QuillanOutput:
        """input_ids (B, T) → logits (B, T, V) plus MoE and diffusion auxiliary losses."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cos, sin = self._rope(self.positions_from_mask(attention_mask))
        mask = self._mask(attention_mask, T, 0)
        h = self.embed_tokens(input_ids)
        zero = h.new_zeros(())
        aux, z, probs, counts = zero, zero, [], []
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                h, stats = checkpoint(block, h, cos, sin, mask, use_reentrant=False)
            else:
                h, stats = block(h, cos, sin, mask)
            if stats is not None:
                aux, z = aux + stats.aux_loss, z + stats.z_loss
                probs.append(stats.council_probs.view(B, T, -1))
                counts.append(stats.expert_counts)
        diff_loss = zero
        if self.diffusion is not None:
            if self.training:
                diff_loss = self.diffusion.denoising_loss(h)
            h = self.diffusion(h)
        return QuillanOutput(self.logits_from_hidden(h), aux, z, diff_loss, probs, counts)

    # -- inference ----------------------------------------------------------------------------
    def _step(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: KVCache,
              slot: int, early_exit: bool, digits: torch.Tensor | None = None) -> torch.Tensor:
        """Run tokens ids (B, T) at cache slots [slot, slot+T) → last-token logits (B, V).

        With early exit (T == 1 only), a row whose intermediate prediction is confident above
        the threshold stops; for the blocks it skips, its keys/values are still computed from
        its exit hidden state so later tokens see a consistent cache (CALM, Schuster et al. 2022).
        """
        B, T = ids.shape
        cos, sin = self._rope(positions)
        mask = self._mask(key_mask, T, slot)[..., : slot + T]
        h = self.embed_tokens(ids, digits)
        L = len(self.blocks)
        active = torch.arange(B, device=ids.device)
        for li, block in enumerate(self.blocks):
            if active.numel() == B:  # every row on: no gathers and scatters (decoding is op-bound)
                h = hs = block(h, cos, sin, mask, (cache.k[li], cache.v[li]), slot, None)[0]
            else:
                hs, _ = block(h[active], cos[active], sin[active], mask[active], (cache.k[li], cache.v[li]), slot, active)
                h = h.clone()
                h[active] = hs
            self.block_evals += active.numel() * T
            if not early_exit or li == L - 1:
                continue
            conf = self.logits_from_hidden(hs[:, -1]).float().softmax(-1).amax(-1)
            done = conf >= self.cfg.early_exit_threshold
            if not bool(done.any()):
                continue
            exited = active[done]
            for lj in range(li + 1, L):  # fill the skipped blocks' cache from the exit state
                blk = self.blocks[lj]
                k, v = blk.attn.kv(blk.norm1(h[exited]), cos[exited], sin[exited])
                cache.k[lj][exited, :, slot : slot + T] = k
                cache.v[lj][exited, :, slot : slot + T] = v
            self.block_evals_saved += exited.numel() * T * (L - 1 - li)
            active = active[~done]
            if active.numel() == 0:
                break
        out = h
        if self.diffusion is not None:
            out = self.diffusion(out[:, -1:])
            return self.logits_from_hidden(out)[:, -1]
        return self.logits_from_hidden(out[:, -1])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row of input_ids (B, T), left-padded per attention_mask; returns
        (B, T + n) with n ≤ max_new_tokens. temperature 0 is greedy. Rows that emitted eos_id
        are filled with eos_id until all rows finish."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_mask = attention_mask.long()
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        seq = input_ids
        self.block_evals = self.block_evals_saved = 0
        if use_cache:
            total = T + max_new_tokens
            cache = KVCache(self.cfg, B, total, input_ids.device, self.embed.weight.dtype)
            positions = self.positions_from_mask(key_mask)
            full_mask = torch.cat([key_mask, key_mask.new_ones(B, max_new_tokens)], dim=1)
            digits = self.digit_index(input_ids) if self.digit_embed is not None else None
            logits = self._step(input_ids, positions, full_mask, cache, 0, early_exit=False, digits=digits)
            pos = positions[:, -1:]
        for i in range(max_new_tokens):
            if not use_cache:
                logits = self.forward(seq, key_mask).logits[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
            if bool(finished.all()) or i == max_new_tokens - 1:
                break
            if use_cache:
                pos = pos + 1
                if digits is not None:  # continue each row's digit run across steps
                    digits = self.digit_index(nxt[:, None], digits[:, -1])
                logits = self._step(nxt[:, None], pos, full_mask, cache, T + i,
                                    early_exit=self.cfg.early_exit_threshold <= 1.0, digits=digits)
        return seq

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; with active_only, those used for one token: the selected experts and
        micro agents only, one row of an untied input embedding (a tied one is the output head)."""
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        cfg = self.cfg
        inactive = 0
        for block in self.blocks:
            if not block.council:
                continue
            ffn = block.ffn
            per_expert = sum(p.numel() for p in ffn.experts[0].parameters())
            inactive += per_expert * (cfg.n_council * cfg.n_experts - cfg.council_top_k * cfg.expert_top_k)
            if cfg.n_micro > 0:
                inactive += 2 * cfg.dim * (cfg.n_council * cfg.n_micro - cfg.council_top_k * cfg.micro_top_k)
        if not cfg.tie_embeddings:  # one input-embedding row per token; a tied matrix is the full head
            inactive += cfg.vocab_size * cfg.dim - cfg.dim
        return total - inactive


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else top-k / nucleus
    (Holtzman et al. 2020) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def model_summary(cfg: QuillanConfig) -> dict[str, int | float]:
    """Parameter counts and sizes of a config, built on the meta device (nothing allocated).

    Bytes: FP32 = 4 per parameter; packed = BitLinear weights at 1.6 bits plus the rest in FP16.
    """
    from quillan.bitnet import bit_linears

    with torch.device("meta"):
        model = Quillan(cfg)
    total = model.num_parameters()
    ternary = sum(m.weight.numel() for m in bit_linears(model))
    return {"parameters": total, "active_parameters": model.num_parameters(active_only=True),
            "ternary_parameters": ternary, "fp32_bytes": 4 * total,
            "packed_bytes": int(ternary * 1.6 / 8 + (total - ternary) * 2)}
