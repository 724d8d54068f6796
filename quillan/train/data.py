"""Tokenized records for causal-LM training: `<bos> prompt \\n target <eos>`, loss on target+eos
(and, weighted by `train.prompt_loss_weight`, on the prompt: `prompt_labels`)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.utils.data import Dataset, Sampler

from quillan.data.tokenizer import model_text, prompt_text, special_ids

IGNORE = -100


class TokenizedRecords(Dataset):
    """Each item: (ids list[int], n_prompt int) — ids = bos + prompt + target + eos, truncated
    to max_len; the first n_prompt ids are context (no loss). Texts as the model reads them
    (`model_text` with the model's `digit_order`)."""

    def __init__(self, records: list[dict[str, Any]], tokenizer: Tokenizer, max_len: int, *, digit_order: str):
        sp = special_ids(tokenizer)
        prompts = tokenizer.encode_batch([model_text(prompt_text(r), digit_order) for r in records])
        targets = tokenizer.encode_batch([model_text(r["target"], digit_order) for r in records])
        self.items = []
        for p, t in zip(prompts, targets):
            ids = ([sp["bos"]] + p.ids + t.ids + [sp["eos"]])[:max_len]
            self.items.append((ids, min(1 + len(p.ids), len(ids) - 1)))
        self.pad_id = sp["pad"]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (nats) over positions whose label is not -100: the mean, or with
    reduction="sum" the total; logits (B, T, V) float, labels (B, T)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` (B, T) and `labels` (B, T): labels[t] is the
    next token where it belongs to the target (or eos), else -100."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for i, (ids, n_prompt) in enumerate(batch):
        t = torch.tensor(ids)
        input_ids[i, : len(ids)] = t
        mask[i, : len(ids)] = 1
        labels[i, n_prompt - 1 : len(ids) - 1] = t[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def prompt_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token labels (B, T) at the prompt's positions of a `collate`d batch, -100 elsewhere:
    position t predicts token t + 1 where t + 1 is a real token and t carries no answer label
    (the answer positions, the last real token and the padding get -100)."""
    out = torch.full_like(batch["input_ids"], IGNORE)
    keep = (batch["labels"][:, :-1] == IGNORE) & (batch["attention_mask"][:, 1:] == 1)
    out[:, :-1] = torch.where(keep, batch["input_ids"][:, 1:], IGNORE)
    return out


class StepBatchSampler(Sampler[list[int]]):
    """Batches for optimizer steps [start_step, total_steps): batch s is a pure function of
    (seed, s), so a run resumed at step k sees exactly the batches an uninterrupted run would.

    Epoch e = s // steps_per_epoch uses permutation(seed, e). Given `lengths`, the permutation
    is cut into chunks of `bucket` batches, each chunk sorted by length and cut into batches,
    and the epoch's batches shuffled again: batches of similar lengths pad far less, and
    every row is still seen once per epoch. With world_size > 1, each rank takes its slice.
    """

    def __init__(self, n: int, batch_size: int, total_steps: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, lengths: list[int] | None = None, bucket: int = 16):
        if batch_size > n:
            raise ValueError(f"batch_size ({batch_size}) is larger than the dataset ({n} rows)")
        self.n, self.bs, self.total, self.seed = n, batch_size, total_steps, seed
        self.start, self.rank, self.world = start_step, rank, world_size
        self.per_epoch = n // batch_size
        self.lengths, self.bucket = lengths, bucket
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)[: self.per_epoch * self.bs].tolist()
        if self.lengths is None:
            batches = [perm[k * self.bs : (k + 1) * self.bs] for k in range(self.per_epoch)]
        else:
            chunk = self.bs * self.bucket
            batches = []
            for c in range(0, len(perm), chunk):
                part = sorted(perm[c : c + chunk], key=lambda i: (self.lengths[i], i))
                batches += [part[k : k + self.bs] for k in range(0, len(part), self.bs)]
            order = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    def batch_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        return self.epoch_batches(epoch)[k][self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield self.batch_indices(step)

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def step_sampler(data: TokenizedRecords, cfg, seed: int, rank: int = 0, world_size: int = 1):
    """The training batches for `cfg` (a TrainConfig): length-bucketed random batches
    (StepBatchSampler), or, for `optimizer: hybrid`, cluster-balanced ones (k-means of the
    examples' token histograms; quillan.train.hybrid). Both have `batch_indices(step)`."""
    lengths = [len(ids) for ids, _ in data.items]
    if cfg.optimizer != "hybrid":
        return StepBatchSampler(len(data), cfg.batch_size, cfg.max_steps, seed, rank=rank, world_size=world_size,
                                lengths=lengths)
    from quillan.train.hybrid import ClusterBalancedSampler, kmeans, token_histograms

    seqs = [ids for ids, _ in data.items]
    hist = token_histograms(seqs, max(max(s) for s in seqs) + 1)
    labels, _ = kmeans(hist, min(cfg.hybrid.clusters, len(data)), cfg.hybrid.kmeans_iters, seed)
    return ClusterBalancedSampler(labels, cfg.batch_size, cfg.max_steps, seed, rank=rank, world_size=world_size)


def tokens_by_step(data: TokenizedRecords, sampler, total_steps: int) -> list[int]:
    """Cumulative real (unpadded) tokens that `sampler` draws: element s is the count over steps
    [0, s), for s = 0 … total_steps (length total_steps + 1)."""
    lengths = [len(ids) for ids, _ in data.items]
    out = [0]
    for step in range(total_steps):
        out.append(out[-1] + sum(lengths[i] for i in sampler.batch_indices(step)))
    return out
