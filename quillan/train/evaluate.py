"""Held-out loss of a model on tokenized records (no Lightning), and the names of val metrics."""

from __future__ import annotations

import math

import torch

from quillan.model import Quillan
from quillan.train.data import IGNORE, TokenizedRecords, collate, masked_ce

# The train stage's greedy val-accuracy metric: overall under this key, per domain under
# f"{VAL_ACCURACY}/<domain>" (MLflow, History rows, plots/train_val.csv columns).
VAL_ACCURACY = "val/accuracy"


@torch.no_grad()
def evaluate_loss(model: Quillan, data: TokenizedRecords, batch_size: int = 64) -> dict[str, float]:
    """Token-weighted mean cross-entropy (nats) over answer tokens, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))], data.pad_id)
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
        total += float(masked_ce(logits, batch["labels"], reduction="sum"))
        count += int((batch["labels"] != IGNORE).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 30.0)), "tokens": count}
