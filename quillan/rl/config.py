"""`GRPOConfig`: the knobs of the `grpo` stage, one documented field each (TRL-style).

Defaults follow DAPO (Yu et al. 2025): clip-higher ε_low = 0.2 / ε_high = 0.28, token-level
loss, no KL term, dynamic sampling on. The council entropy bonus β_Ω = 0.05 is seed note 001's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quillan.data.generators import Domain
from quillan.rl.grpo import AdvantageMode, ImportanceSamplingLevel, LossType, ScaleRewards


class RewardWeights(BaseModel):
    """CCRL multi-objective reward (seed note 001): w_R·R_correct + w_C·R_format − w_E·R_error."""

    model_config = ConfigDict(extra="forbid")
    correct: float = Field(1.0, ge=0, description="w_R: weight of the verifier's exact-match reward (0/1)")
    format: float = Field(0.1, ge=0, description="w_C: completion ended with <eos> (and has 'Answer:' where the task's target does)")
    error: float = Field(0.5, ge=0, description="w_E: penalty for an empty answer")


class GRPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="false: models/grpo is a copy of models/train (no RL)")
    steps: int = Field(60, ge=0, description="policy-update batches (each: rollouts, advantages, μ updates)")
    prompts_per_step: int = Field(16, ge=1, description="groups (distinct prompts) per batch")
    domains: list[Domain] | None = Field(
        None, min_length=1, description="draw training prompts from these domains only (null: all)")
    prompt_sampling: Literal["uniform", "learnability"] = Field(
        "uniform", description="uniform over training records, or records weighted by their task's chance "
                                    "of an informative group (rollout success rate so far; Foster & Foerster 2025)")
    sampling_floor: float = Field(0.05, gt=0, le=1, description="least weight of a task under learnability sampling "
                                                                "(every task keeps being tried)")
    group_size: int = Field(8, ge=2, description="G: completions sampled per prompt")
    temperature: float = Field(1.0, gt=0, le=2, description="sampling temperature of the rollouts")
    top_k: int | None = Field(None, ge=1, description="top-k sampling of the rollouts (null: full distribution)")
    max_new_tokens: int = Field(48, ge=1, description="L_max: completion length budget, tokens")
    num_iterations: int = Field(1, ge=1, description="μ: policy updates per batch of rollouts")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant after lr_warmup_steps)")
    lr_warmup_steps: int = Field(5, ge=0, description="linear LR warmup, steps")
    weight_decay: float = Field(0.0, ge=0)
    update: Literal["all", "full_precision"] = Field(
        "all", description="parameters GRPO updates: all, or only the full-precision ones (embedding/head, "
                           "norms, routers, overseer, micro agents), every ternary code left as trained")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    advantage: AdvantageMode = Field(
        "grpo", description="group advantage: (R−mean)/std, R−mean (Dr. GRPO), or clip to [0, 1] (seed note 000)")
    scale_rewards: ScaleRewards = Field(
        "group", description="std dividing the centred rewards: of each group (GRPO), of the whole batch, "
                             "or none (Dr. GRPO); TRL's scale_rewards")
    importance_sampling_level: ImportanceSamplingLevel = Field(
        "token", description="policy ratio per token (GRPO/DAPO) or one length-normalised ratio per sequence, "
                             "clipped as a whole (GSPO, arXiv 2507.18071; GSPO clips with ε ≈ 3e-4/4e-4); "
                             "TRL's importance_sampling_level")
    loss_type: LossType = Field("dapo", description="aggregation over tokens")
    eps_low: float = Field(0.2, gt=0, lt=1, description="lower clip ε_low of the ratio")
    eps_high: float = Field(0.28, gt=0, description="upper clip ε_high of the ratio (clip-higher)")
    beta: float = Field(0.0, ge=0, description="k3 KL weight to the frozen starting model (0: no reference)")
    council_entropy_bonus: float = Field(0.05, ge=0, description="β_Ω: loss −= β_Ω·H(α) over the overseer weights")
    sft_weight: float = Field(0.0, ge=0, description="γ: weight of a next-token cross-entropy on `sft_batch` training "
                                                     "records (prompt → target, all domains) added to each update, "
                                                     "InstructGPT's PPO-ptx (Ouyang et al. 2022, §3.5): holds the skills "
                                                     "no informative group rewards (0: off)")
    sft_batch: int = Field(32, ge=1, description="training records in each update's cross-entropy term (with sft_weight > 0)")
    rewards: RewardWeights = Field(default_factory=RewardWeights)
    overlong_cache: int = Field(0, ge=0, description="L_cache: DAPO soft overlong zone, tokens (0: off)")
    dynamic_sampling: bool = Field(True, description="drop all-equal-reward groups and draw more prompts")
    max_draws: int = Field(3, ge=1, description="rollout draws per step at most, with dynamic sampling")
    eval_size: int = Field(0, ge=0, description="stratified records of val (the rollback decision) and of test "
                                                "(reported) for before/after accuracy (0: the whole split)")
    eval_max_new_tokens: int | None = Field(
        None, ge=1, description="greedy decoding budget of the accuracy evaluation (null: max_new_tokens, one budget "
                                "for rollouts and evaluation, so every answer the model is scored on can also earn reward)")
    rollback_tolerance: float = Field(0.01, ge=0, le=1,
                                      description="keep the pre-GRPO weights if val accuracy drops by more than this "
                                                  "(and by more than rollback_z standard errors)")
    rollback_z: float = Field(1.96, ge=0, description="standard errors of the val accuracy difference a drop must "
                                                      "exceed to roll back (0: the fixed tolerance alone)")
    pass_at_size: int = Field(0, ge=0, description="stratified val records on which pass@1 and pass@G (G = group_size "
                                                   "samples at the rollout temperature) are measured before and "
                                                   "after GRPO, per task family (0: not measured)")
    checkpoint_every: int = Field(20, ge=1, description="resumable checkpoint every N steps")

    @property
    def eval_tokens(self) -> int:
        """The evaluation's decoding budget (eval_max_new_tokens, else max_new_tokens)."""
        return self.eval_max_new_tokens or self.max_new_tokens

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        if self.advantage == "dr_grpo" and "scale_rewards" in self.model_fields_set and self.scale_rewards != "none":
            raise ValueError(f"advantage 'dr_grpo' divides by no std; it contradicts scale_rewards "
                             f"{self.scale_rewards!r} (set scale_rewards: none, or advantage: grpo)")
        if self.overlong_cache >= self.max_new_tokens:
            raise ValueError(f"overlong_cache ({self.overlong_cache}) must be < max_new_tokens ({self.max_new_tokens})")
        return self
