"""GRPO / DAPO objectives and the council (CCRL) terms.

Sources: GRPO — Shao et al. 2024, "DeepSeekMath", §4.1 (group-normalised advantages);
Dr. GRPO — Liu et al. 2025, "Understanding R1-Zero-Like Training" (no std division, constant
normaliser); DAPO — Yu et al. 2025 (clip-higher ε_low/ε_high, token-level loss, dynamic sampling,
overlong reward shaping, §3.1-3.4); k3 KL estimator — Schulman 2020, "Approximating KL
divergence"; CCRL council entropy and multi-objective reward — seed note 001; prompt sampling
by learnability — Foster & Foerster 2025, "Learning to Reason at the Frontier of Learnability".
Shapes: B sequences (= prompts × G), T completion tokens; masks are 1 on completion tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence, get_args

import torch

AdvantageMode = Literal["grpo", "dr_grpo", "positive_clip"]
ADVANTAGE_MODES = get_args(AdvantageMode)
LossType = Literal["grpo", "dapo", "dr_grpo"]
LOSS_TYPES = get_args(LossType)
# TRL's GRPOConfig names: the std that scales centred rewards, and where the ratio is taken.
ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS = get_args(ScaleRewards)
ImportanceSamplingLevel = Literal["token", "sequence"]
IMPORTANCE_SAMPLING_LEVELS = get_args(ImportanceSamplingLevel)


def group_advantages(rewards: torch.Tensor, group_size: int, mode: str = "grpo", eps: float = 1e-6,
                     scale: str = "group") -> torch.Tensor:
    """Per-sequence advantages (B·G,) from flat rewards (B·G,), G completions per prompt in a row.

    Centred rewards R − mean_g are divided by `scale`'s std + eps: `group`, the sample std of
    each group (GRPO, as TRL's default); `batch`, the sample std of all B·G rewards (TRL's
    scale_rewards="batch"); `none`, no division (Dr. GRPO, Liu et al. 2025 §3.1). Modes: grpo,
    that; dr_grpo, R − mean_g whatever `scale` says; positive_clip, clip(that, 0, 1) (seed note
    000: only better-than-average samples learn). A group whose rewards are all equal gets 0.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r} (one of: {', '.join(ADVANTAGE_MODES)})")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown reward scaling {scale!r} (one of: {', '.join(SCALE_REWARDS)})")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    if mode == "dr_grpo" or scale == "none":
        adv = centred
    else:
        adv = centred / ((std if scale == "group" else r.std()) + eps)
    if mode == "positive_clip":
        adv = adv.clamp(0.0, 1.0)
    adv = torch.where(std > 0, adv, torch.zeros_like(adv))
    return adv.reshape(-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                loss_type: str, eps_low: float = 0.2, eps_high: float = 0.28, ref_logp: torch.Tensor | None = None,
                beta: float = 0.0, max_len: int | None = None,
                level: str = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-surrogate policy loss over completion tokens.

    Per token: r = exp(logp − old_logp), ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A)
    (+ β·(exp(ref − logp) − (ref − logp) − 1) with a reference). With `level="sequence"` (GSPO,
    Zheng et al. 2025, arXiv 2507.18071, eq. 5-7) every token of sequence i uses the sequence's
    length-normalised ratio s_i = exp(mean over its tokens of (logp − old_logp)), so a sequence is
    clipped as a whole (as TRL's importance_sampling_level="sequence"). Aggregation by
    `loss_type`: grpo — mean over each sequence's tokens, then over sequences; dapo — sum over all
    tokens / all tokens; dr_grpo — sum / (B · max_len) (max_len defaults to T).
    Returns (loss, stats) with stats clip_low, clip_high (shares of tokens), ratio_mean, kl.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r} (one of: {', '.join(LOSS_TYPES)})")
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance sampling level {level!r} "
                         f"(one of: {', '.join(IMPORTANCE_SAMPLING_LEVELS)})")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
                     ).expand_as(logp)
    ratio = torch.exp(log_ratio)
    per_tok = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    kl = torch.zeros_like(per_tok)
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        per_tok = per_tok + beta * kl
    n_tok = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        loss = (per_tok * mask).sum() / n_tok
    else:
        loss = (per_tok * mask).sum() / (logp.shape[0] * (max_len or logp.shape[1]))
    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(logp.dtype)
        stats = {"clip_low": float((low * mask).sum() / n_tok), "clip_high": float((high * mask).sum() / n_tok),
                 "ratio_mean": float((ratio * mask).sum() / n_tok), "kl": float((kl * mask).sum() / n_tok)}
    return loss, stats


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (§3.4) for completion lengths L:
    0 if L ≤ L_max − L_cache; ((L_max − L_cache) − L) / L_cache inside the zone; −1 if L > L_max."""
    L = lengths.float()
    start = max_len - cache_len
    zone = (start - L) / cache_len
    return torch.where(L <= start, torch.zeros_like(L), torch.where(L <= max_len, zone, -torch.ones_like(L)))


def council_entropy(council_probs: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """H(α) = −Σ_i α_i log α_i of the overseer's weights, averaged over masked tokens and over
    council layers (seed note 001). council_probs: per layer (B, T, M); mask (B, T)."""
    if not council_probs:
        return mask.new_zeros((), dtype=torch.float32)
    m = mask.float()
    per_layer = []
    for a in council_probs:
        h = -(a.float() * a.float().clamp(min=1e-12).log()).sum(-1)  # (B, T)
        per_layer.append((h * m).sum() / m.sum().clamp(min=1.0))
    return torch.stack(per_layer).mean()


def multi_objective_reward(correct: torch.Tensor, format_ok: torch.Tensor, error: torch.Tensor, w_correct: float,
                           w_format: float, w_error: float) -> torch.Tensor:
    """CCRL reward (seed note 001): w_R·R_correct + w_C·R_format − w_E·R_error, per completion."""
    return w_correct * correct.float() + w_format * format_ok.float() - w_error * error.float()


def dynamic_sample(draw: Callable[[], list[dict[str, Any]]], groups_wanted: int,
                   max_draws: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """DAPO dynamic sampling (§3.2): keep drawing batches of groups (each a dict with a
    `rewards` tensor of shape (G,)) and keep only groups whose rewards are not all equal, until
    `groups_wanted` are kept or `max_draws` draws are spent. Returns (kept, {"dropped", "draws"})."""
    kept: list[dict[str, Any]] = []
    dropped = draws = 0
    while len(kept) < groups_wanted and draws < max_draws:
        draws += 1
        for group in draw():
            r = group["rewards"]
            if bool((r == r[0]).all()):
                dropped += 1
            elif len(kept) < groups_wanted:
                kept.append(group)
    return kept, {"dropped": dropped, "draws": draws}


def informative_probability(successes: torch.Tensor, trials: torch.Tensor, group_size: int,
                            prior: float = 1.0) -> torch.Tensor:
    """Chance that a group of G completions of a task has unequal 0/1 correctness (and so a
    non-zero GRPO advantage): 1 − p^G − (1 − p)^G, with p the posterior-mean success rate
    (s + prior) / (n + 2·prior) under a Beta(prior, prior) prior. A task never tried has p = 1/2.

    This is the exact-G form of the learnability p(1 − p) by which Foster & Foerster (2025) pick
    prompts: tasks the policy always or never solves teach nothing. Shapes: (T,) → (T,)."""
    p = (successes.double() + prior) / (trials.double() + 2 * prior)
    return (1.0 - p.pow(group_size) - (1.0 - p).pow(group_size)).float()
