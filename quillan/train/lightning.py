"""Lightning pieces for training Quillan: the module, the data module and the callbacks.

Importing this module imports Lightning (~7 s); the rest of `quillan` does not.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from quillan.bitnet import bit_linears, set_lambda, weight_sparsity
from quillan.config import QuillanConfig
from quillan.model import Quillan
from quillan.errors import NonFiniteError
from quillan.train.config import TrainConfig
from quillan.train.evaluate import VAL_ACCURACY
from quillan.train.data import IGNORE, TokenizedRecords, collate, masked_ce, prompt_labels, step_sampler
from quillan.train.schedules import lambda_at, lr_at


def worst_cluster(logits: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor) -> int:
    """The cluster whose rows have the highest mean per-row cross-entropy; logits (B, T, V),
    labels (B, T) with -100 for no loss, clusters (B,)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # (B, T)
    per_row = ce.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)
    best, worst = -1.0, 0
    for c in clusters.unique().tolist():
        mean = float(per_row[clusters == c].mean())
        if mean > best:
            best, worst = mean, int(c)
    return worst


class QuillanDataModule(L.LightningDataModule):
    """Tokenized splits. Training batches are a pure function of the optimizer step.

    Lightning re-creates and prefetches dataloader iterators when it resumes mid-epoch, so a
    sampler cannot know which step a batch will serve. Instead the train dataloader yields the
    step numbers and `batch(step)` builds the batch inside `training_step`, from
    `StepBatchSampler.batch_indices(step)`: a resumed run sees exactly the batches an
    uninterrupted one does.
    """

    def __init__(self, train: TokenizedRecords, val: TokenizedRecords, cfg: TrainConfig, seed: int):
        super().__init__()
        self.train_set, self.val_set, self.cfg, self.seed = train, val, cfg, seed

    def _sampler(self):
        if getattr(self, "_step_sampler", None) is None:
            t = self.trainer
            self._step_sampler = step_sampler(self.train_set, self.cfg, self.seed, rank=t.global_rank if t else 0,
                                              world_size=t.world_size if t else 1)
        return self._step_sampler

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Collated batch of step `step`; with cluster-balanced batches also `cluster` (B,), each row's cluster."""
        idx = self._sampler().batch_indices(step)
        out = collate([self.train_set[i] for i in idx], self.train_set.pad_id)
        labels = getattr(self._sampler(), "labels", None)
        if labels is not None:
            out["cluster"] = labels[idx]
        return out

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer else 0
        return DataLoader(list(range(start, self.cfg.max_steps)), batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        pad = self.val_set.pad_id
        n = min(len(self.val_set), self.cfg.val_batches * self.cfg.batch_size)
        subset = torch.utils.data.Subset(self.val_set, range(n))
        return DataLoader(subset, batch_size=self.cfg.batch_size, shuffle=False, collate_fn=lambda b: collate(b, pad))


class QuillanLightning(L.LightningModule):
    """Causal-LM training of `Quillan` with the MoE and diffusion auxiliary losses.

    loss = CE(answer tokens) + w_prompt·CE(prompt tokens) + w_aux·load_balance + w_z·z_loss + w_diff·denoising
    `reference=True` builds the full-precision reference (every BitLinear a plain Linear, λ = 0).
    `val_probe(model)`, if given, runs at every validation check and returns
    `quillan.inference.accuracy_by_domain`'s dict; its overall and per-domain accuracy are logged
    as `val/accuracy` and `val/accuracy/<domain>`.
    """

    # AdamW's fused kernel: one pass per tensor instead of ~8 ops (34 → 4 ms a step for the cpu
    # preset's 225 tensors on 2 threads), AdamW to float rounding. False: the for-loop AdamW
    # (bench.train_step's old step).
    fused_adamw = True

    def __init__(self, model_cfg: QuillanConfig, cfg: TrainConfig, seed: int, reference: bool = False,
                 init_state: dict[str, torch.Tensor] | None = None,
                 val_probe: Callable[[torch.nn.Module], dict[str, Any]] | None = None):
        super().__init__()
        if reference:
            model_cfg = QuillanConfig(**{**model_cfg.to_dict(), "quantize": False})
        torch.manual_seed(seed)
        self.model = Quillan(model_cfg)
        if init_state is not None:
            self.model.load_state_dict(init_state)
        self.cfg, self.seed, self.reference, self.val_probe = cfg, seed, reference, val_probe
        if reference:
            set_lambda(self.model, 0.0)
        self._t0 = None
        self.expert_load: list[torch.Tensor] = []  # per logging step: (layers, M·E) token shares

    # -- steps ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(batch["input_ids"], batch["attention_mask"])

    def training_step(self, step_hint: int, batch_idx: int) -> torch.Tensor:
        batch = self.trainer.datamodule.batch(self.global_step)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # Per-step seed: the diffusion noise of step s is the same whether or not the run resumed.
        torch.manual_seed(self.seed * 7919 + self.global_step * 131 + self.global_rank)
        out = self(batch)
        ce = masked_ce(out.logits, batch["labels"])
        c = self.cfg
        loss = ce + c.aux_loss_weight * out.aux_loss + c.z_loss_weight * out.z_loss + c.diffusion_loss_weight * out.diffusion_loss
        prompt_ce = None
        if c.prompt_loss_weight:
            prompt_ce = masked_ce(out.logits, prompt_labels(batch))
            loss = loss + c.prompt_loss_weight * prompt_ce
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss ({loss.item()}) at step {self.global_step}")
        hybrid = self._hybrid_optimizer()
        if hybrid is not None:
            hybrid.worst_cluster = worst_cluster(out.logits.detach(), batch["labels"], batch["cluster"])
        n_tok = int(batch["attention_mask"].sum())
        now = time.perf_counter()
        log = {"train/loss": ce, "train/perplexity": torch.exp(ce.detach().clamp(max=30)),
               "train/aux_loss": out.aux_loss, "train/z_loss": out.z_loss, "train/diffusion_loss": out.diffusion_loss,
               "train/total_loss": loss, "lr": self.optimizers().param_groups[0]["lr"]}
        if prompt_ce is not None:
            log["train/prompt_loss"] = prompt_ce
        if hybrid is not None and hybrid.last:  # the previous step's choices
            log.update({f"hybrid/{k}": v for k, v in hybrid.last.items()})
        if self._t0 is not None:
            log["train/tokens_per_s"] = n_tok * self.trainer.world_size / max(now - self._t0, 1e-9)
        self._t0 = now
        if out.expert_counts and self.global_step % c.log_every == 0:
            counts = torch.stack([x.flatten().float() for x in out.expert_counts])  # (layers, M·E)
            share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
            self.expert_load.append(share.cpu())
            ent = -(share.clamp(min=1e-12).log() * share).sum(-1).mean() / math.log(share.shape[-1])
            log["train/expert_load_entropy"] = ent
            for layer, row in enumerate(share):  # per-expert token share, e.g. expert_share/l0/e5
                log.update({f"expert_share/l{layer}/e{e}": v for e, v in enumerate(row.tolist())})
            log["train/weight_sparsity"] = weight_sparsity(self.model)
        self.log_dict(log, on_step=True, prog_bar=False, batch_size=batch["input_ids"].shape[0])
        self.log("loss", ce, prog_bar=True, on_step=True, logger=False)
        return loss

    def _hybrid_optimizer(self):
        from quillan.train.hybrid import HybridTrustRegion

        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        return opt if isinstance(opt, HybridTrustRegion) else None

    def on_before_optimizer_step(self, optimizer) -> None:
        for name, p in self.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(f"non-finite gradient in {name} at step {self.global_step}")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ce = masked_ce(self(batch).logits, batch["labels"])
        self.log("val/loss", ce, on_epoch=True, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/perplexity", torch.exp(loss.clamp(max=30)), sync_dist=True)
        if self.val_probe is not None and not self.trainer.sanity_checking:
            # The model as it is at this step (λ included); greedy decoding draws no random numbers,
            # and every training step reseeds, so the probe leaves the run's trajectory unchanged.
            acc = self.val_probe(self.model)
            self.log(VAL_ACCURACY, float(acc["accuracy"]))
            for domain, value in sorted(acc["by_domain"].items()):
                self.log(f"{VAL_ACCURACY}/{domain}", float(value))

    def configure_optimizers(self):
        c = self.cfg
        muon = {id(m.weight): m.weight for m in bit_linears(self.model)} if c.optimizer == "muon" else {}
        rest = [p for p in self.model.parameters() if id(p) not in muon]
        decay = [p for p in rest if p.dim() >= 2]
        no_decay = [p for p in rest if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if c.optimizer == "muon":
            from quillan.train.muon import MuonAdamW

            opt = MuonAdamW(muon.values(), groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay,
                            momentum=c.muon_momentum, fused=self.fused_adamw)
        elif c.optimizer == "hybrid":
            from quillan.train.hybrid import HybridTrustRegion

            opt = HybridTrustRegion(groups, c.hybrid, c.max_steps, self.seed, lr=c.lr, betas=c.betas)
        else:
            opt = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, fused=self.fused_adamw)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, LRMultiplier(c.max_steps, c.lr_warmup_steps, c.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LRMultiplier:
    """Picklable-free callable for LambdaLR (a plain object: its state is three numbers)."""

    def __init__(self, total: int, warmup: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.min_ratio)


class LambdaWarmup(L.Callback):
    """Sets λ on every BitLinear before each optimizer step (seed note 004) and logs it."""

    def __init__(self, total_steps: int, warmup_frac: float, kind: str):
        self.total, self.frac, self.kind = total_steps, warmup_frac, kind

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lam = lambda_at(trainer.global_step, self.total, self.frac, self.kind)
        set_lambda(pl_module.model, lam)
        pl_module.log("lambda", lam, on_step=True, prog_bar=True)

    def on_train_end(self, trainer, pl_module) -> None:
        set_lambda(pl_module.model, 1.0)  # the output is pure ternary whatever the schedule


class History(L.Callback):
    """Step-indexed training and validation scalars, for plots and DVC plot files.

    Its state is saved in checkpoints, so a resumed run's history is complete.
    """

    TRAIN_KEYS = ("train/loss", "lambda", "lr", "train/expert_load_entropy", "train/weight_sparsity")

    def __init__(self):
        self.train_rows: list[dict[str, float]] = []
        self.val_rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        row = {"step": float(trainer.global_step)}
        row.update({k: float(m[k]) for k in self.TRAIN_KEYS if k in m})
        self.train_rows.append(row)

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        if trainer.sanity_checking or "val/loss" not in m:
            return
        row = {"step": float(trainer.global_step), "val/loss": float(m["val/loss"])}
        row.update({k: float(v) for k, v in m.items() if k.startswith(VAL_ACCURACY)})
        self.val_rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"train_rows": self.train_rows, "val_rows": self.val_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_rows, self.val_rows = list(state["train_rows"]), list(state["val_rows"])
