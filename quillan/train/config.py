"""`TrainConfig`: the knobs of the `train` stage, documented per field (units in the description)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quillan.train.hybrid import HybridConfig
from quillan.train.schedules import LambdaSchedule


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(900, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="sequences per step (global, split across devices)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW's; Muon's RMS-matched update takes the same)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a share of the peak (cosine)")
    lr_warmup_steps: int = Field(50, ge=0, description="linear LR warmup, steps")
    weight_decay: float = Field(0.05, ge=0, description="decoupled weight decay on ≥2-D weights (AdamW and Muon)")
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: Literal["adamw", "hybrid", "muon"] = Field(
        "adamw", description="adamw; hybrid: cluster-balanced batches, AdamW with a learned LR multiplier and "
                             "trust-region clip (seed note 003; quillan/train/hybrid.py), knobs under train.hybrid; "
                             "muon: Muon on the BitLinear weights at AdamW's lr and weight decay (RMS-matched "
                             "update), AdamW on the rest (quillan/train/muon.py)")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's Nesterov momentum (train.optimizer: muon)")
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    lambda_schedule: LambdaSchedule = Field("linear", description="λ warmup shape (seed note 004)")
    warmup_frac: float = Field(0.4, ge=0, le=1, description="share of steps over which λ goes 0 → 1")
    prompt_loss_weight: float = Field(
        0.0, ge=0, description="weight of the next-token loss on prompt tokens, added to the answer tokens' loss "
                               "(an auxiliary language-modelling signal at no extra compute; 0: answers only)")
    aux_loss_weight: float = Field(0.01, ge=0, description="MoE load-balancing loss weight")
    z_loss_weight: float = Field(0.001, ge=0, description="router z-loss weight")
    diffusion_loss_weight: float = Field(0.1, ge=0, description="denoising loss weight")
    val_every: int = Field(100, ge=1, description="validate every N steps (and at the end)")
    val_batches: int = Field(8, ge=1, description="validation batches per check")
    val_accuracy_size: int = Field(0, ge=0, description="stratified val records decoded greedily at every validation "
                                   "check: val/accuracy overall and per domain against training tokens (0: off)")
    checkpoint_every: int = Field(100, ge=1, description="resumable checkpoint every N steps")
    log_every: int = Field(10, ge=1, description="MLflow/Lightning logging interval, steps")
    fp_reference: bool = Field(False, description="also train a full-precision reference (λ = 0)")
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    accelerator: Literal["cpu", "gpu", "cuda", "auto"] = "cpu"
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = "auto"
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    init_checkpoint: str | None = Field(None, description="model directory to start from (default: fresh init)")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.lr_warmup_steps >= self.max_steps:
            raise ValueError(f"lr_warmup_steps ({self.lr_warmup_steps}) must be < max_steps ({self.max_steps})")
        if self.batch_size % (self.devices * self.num_nodes):
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by devices × num_nodes "
                             f"({self.devices * self.num_nodes})")
        if self.precision == "16-mixed" and self.accelerator == "cpu":
            raise ValueError("precision '16-mixed' needs a GPU; use 'bf16-mixed' or '32-true' on the CPU")
        return self
