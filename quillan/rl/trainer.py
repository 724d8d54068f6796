"""The GRPO/DAPO training loop on verifiable rewards, with the CCRL council entropy bonus.

One step (DeepSeekMath §4.1 with DAPO's changes): draw prompts, sample G completions each,
score them with the verifiers, drop all-equal groups and draw again (dynamic sampling), compute
group advantages, keep the rollout log-probs as π_old, then μ = `num_iterations` updates of

    loss = policy_loss(logp, old_logp, A) − β_Ω · H(α)     (+ β·KL_k3 to a frozen reference)

Everything random in step s comes from generators seeded by (seed, s), so a run resumed at
step s makes the same updates as an uninterrupted one.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from tokenizers import Tokenizer

from quillan.bitnet import ternary_parameters
from quillan.data.tokenizer import special_ids
from quillan.errors import NonFiniteError
from quillan.inference import task_of
from quillan.model import Quillan
from quillan.rl.config import GRPOConfig
from quillan.rl.grpo import council_entropy, dynamic_sample, group_advantages, informative_probability, policy_loss
from quillan.rl.rollout import Group, completion_logprobs, pack_groups, sample_groups
from quillan.train.data import TokenizedRecords, collate, masked_ce


class GRPOTrainer:
    """Holds the policy, its optimizer and (with β > 0) the frozen reference model."""

    def __init__(self, model: Quillan, tokenizer: Tokenizer, records: list[dict[str, Any]], cfg: GRPOConfig,
                 seed: int):
        # The cross-entropy anchor covers every domain, whatever the prompts RL draws from.
        self.sft_data = (TokenizedRecords(records, tokenizer, model.cfg.max_seq_len, digit_order=model.cfg.digit_order)
                         if cfg.sft_weight > 0 else None)
        if cfg.domains is not None:
            records = [r for r in records if r["domain"] in cfg.domains]
        if len(records) < cfg.prompts_per_step:
            raise ValueError(f"{len(records)} training records, fewer than grpo.prompts_per_step ({cfg.prompts_per_step})")
        self.model, self.tokenizer, self.records, self.cfg, self.seed = model, tokenizer, records, cfg, seed
        self.pad_id = special_ids(tokenizer)["pad"]
        self.tasks = sorted({task_of(r) for r in records})
        task_index = {t: i for i, t in enumerate(self.tasks)}
        self.record_task = torch.tensor([task_index[task_of(r)] for r in records])
        self.task_size = torch.bincount(self.record_task, minlength=len(self.tasks)).double()
        # Rollout correctness so far per task: {task: [correct, completions]} (saved in checkpoints).
        self.task_stats: dict[str, list[int]] = {t: [0, 0] for t in self.tasks}
        self.reference = None
        if cfg.beta > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if cfg.update == "full_precision":
            for p in ternary_parameters(model):
                p.requires_grad_(False)
        trained = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.dim() >= 2]
        no_decay = [p for p in trained if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99),
                                           fused=True)  # one kernel per tensor (see the train stage's)

    # -- randomness of step s ------------------------------------------------------------------
    def _generator(self, step: int, draw: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + draw)

    def task_weights(self) -> torch.Tensor:
        """Sampling weight of each task (T,): its chance of an informative group, at least the floor."""
        c = self.cfg
        s, n = (torch.tensor([self.task_stats[t][i] for t in self.tasks]) for i in (0, 1))
        return informative_probability(s, n, c.group_size).clamp(min=c.sampling_floor)

    def draw_prompts(self, step: int, draw: int) -> list[dict[str, Any]]:
        """`prompts_per_step` distinct training records for draw `draw` of step `step`: uniform, or
        (learnability) each record weighted by its task's weight shared over the task's records."""
        g = self._generator(step, 10_000 + draw)
        k = self.cfg.prompts_per_step
        if self.cfg.prompt_sampling == "uniform":
            idx = torch.randperm(len(self.records), generator=g)[:k]
        else:
            w = (self.task_weights().double() / self.task_size)[self.record_task]
            idx = torch.multinomial(w, k, replacement=False, generator=g)
        return [self.records[i] for i in idx.tolist()]

    def _count(self, groups: list[Group]) -> None:
        for grp in groups:
            stat = self.task_stats[task_of(grp.record)]
            stat[0] += int(grp.correct.sum())
            stat[1] += len(grp.completions)

    def rollouts(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """Groups for the update of `step`: with dynamic sampling, only groups whose rewards differ,
        drawing up to `max_draws` times. Stats describe every group drawn."""
        c = self.cfg
        drawn: list[Group] = []
        counter = iter(range(c.max_draws))

        def draw() -> list[dict[str, Any]]:
            d = next(counter)
            groups = sample_groups(self.model, self.tokenizer, self.draw_prompts(step, d), c.group_size,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                                   weights=c.rewards, overlong_cache=c.overlong_cache,
                                   generator=self._generator(step, d))
            drawn.extend(groups)
            self._count(groups)
            return [{"rewards": g.rewards, "group": g} for g in groups]

        if c.dynamic_sampling:
            kept_dicts, ds = dynamic_sample(draw, c.prompts_per_step, c.max_draws)
            kept = [d["group"] for d in kept_dicts]
        else:
            kept, ds = [d["group"] for d in draw()], {"dropped": 0, "draws": 1}
        cat = lambda attr: torch.cat([getattr(g, attr) for g in drawn])  # noqa: E731
        lengths = torch.tensor([float(len(x)) for g in drawn for x in g.completions])
        zero_var = sum(bool((g.rewards == g.rewards[0]).all()) for g in drawn)
        stats = {"reward_mean": float(cat("rewards").mean()), "reward_std": float(cat("rewards").std()),
                 "accuracy": float(cat("correct").mean()), "reward_correct": float(cat("correct").mean()),
                 "reward_format": float(cat("format_ok").mean()), "reward_error": float(cat("error").mean()),
                 "reward_overlong": float(cat("overlong").mean()), "completion_length": float(lengths.mean()),
                 "zero_variance_share": zero_var / len(drawn), "groups_dropped": float(ds["dropped"]),
                 "draws": float(ds["draws"]), "groups_kept": float(len(kept))}
        return kept, stats

    def anchor_batch(self, step: int) -> dict[str, torch.Tensor]:
        """`sft_batch` training records for step `step` (the same whether or not the run resumed),
        collated: input_ids, attention_mask, labels (B, T)."""
        g = self._generator(step, 20_000)
        idx = torch.randperm(len(self.sft_data), generator=g)[: self.cfg.sft_batch].tolist()
        return collate([self.sft_data[i] for i in idx], self.sft_data.pad_id)

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / (self.cfg.lr_warmup_steps + 1))

    def step(self, step: int) -> dict[str, float]:
        """One GRPO step; returns its statistics. A batch with no informative group (every group's
        rewards equal) makes no update and reports `skipped` = 1."""
        c = self.cfg
        t0 = time.perf_counter()
        torch.manual_seed(self.seed * 7919 + step)  # the diffusion denoiser's noise in train mode
        groups, stats = self.rollouts(step)
        batch = pack_groups(groups, self.pad_id) if groups else None
        adv = group_advantages(batch["rewards"], c.group_size, c.advantage, scale=c.scale_rewards) if batch else None
        if batch is None or not bool((adv != 0).any()):
            return {**stats, "skipped": 1.0, "seconds": time.perf_counter() - t0}
        self.model.train()
        mask = batch["completion_mask"]
        ref_logp = old_logp = None
        with torch.no_grad():
            if self.reference is not None:
                ref_logp = completion_logprobs(self.reference, batch, c.temperature)[0]
            if c.num_iterations > 1:
                old_logp = completion_logprobs(self.model, batch, c.temperature)[0]
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        sft = self.anchor_batch(step) if self.sft_data is not None else None
        agg: dict[str, float] = {}
        for _ in range(c.num_iterations):
            logp, alphas = completion_logprobs(self.model, batch, c.temperature)
            old = old_logp if old_logp is not None else logp.detach()  # μ = 1: ratio 1, gradient of A·logp
            pl, pstats = policy_loss(logp, old, adv, mask, loss_type=c.loss_type, eps_low=c.eps_low,
                                     eps_high=c.eps_high, ref_logp=ref_logp, beta=c.beta,
                                     max_len=c.max_new_tokens, level=c.importance_sampling_level)
            entropy = council_entropy(alphas, mask)
            loss = pl - c.council_entropy_bonus * entropy
            extra: dict[str, float] = {}
            if sft is not None:
                sft_ce = masked_ce(self.model(sft["input_ids"], sft["attention_mask"]).logits, sft["labels"])
                loss = loss + c.sft_weight * sft_ce
                extra["sft_loss"] = sft_ce.item()
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite loss ({loss.item()}) at step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(f"non-finite gradient norm ({float(grad_norm)}) at step {step}")
            self.optimizer.step()
            for k, v in {**pstats, "policy_loss": pl.item(), "council_entropy": entropy.item(), "loss": loss.item(),
                         "grad_norm": float(grad_norm), **extra}.items():
                agg[k] = agg.get(k, 0.0) + v / c.num_iterations
        return {**stats, **agg, "skipped": 0.0, "lr": self.lr_at(step), "seconds": time.perf_counter() - t0}

    # -- resumable state (safetensors-able tensors + JSON-able scalars; no pickles) ------------------
    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW moments and step counters as flat tensors `"{param index}.{name}"`."""
        state = self.optimizer.state_dict()["state"]
        return {f"{i}.{k}": v.detach().clone().contiguous() for i, s in state.items() for k, v in s.items()}

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = value
        sd = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
