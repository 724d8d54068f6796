"""Measurements of a loaded model: CPU speed (prefill and batch-1 decode) and the quality gate.

Timings are medians of repeated runs after a warm-up, in tokens per second of wall time, with
the thread count they ran on (`torch.get_num_threads()`).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from quillan.inference import paired_standard_error
from quillan.model import Quillan


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eval_size: int = Field(0, ge=0, description="test records for exact-match accuracy (0: the whole split)")
    ppl_size: int = Field(0, ge=0, description="records of val and of test for perplexity (0: whole splits)")
    eval_max_new_tokens: int = Field(64, ge=1, description="greedy decoding budget of the accuracy evaluation")
    max_accuracy_drop: float = Field(0.10, ge=0, le=1,
                                     description="gate: a variant more than this share (0.10 = 10 points) below "
                                                 "the unquantized model fails and is never registered")
    primary_metric: Literal["accuracy", "decode_tokens_per_s", "size_bytes"] = Field(
        "accuracy", description="what picks the champion (size: lower is better); ties go to the smaller")
    champion_tolerance_se: float = Field(
        2.0, ge=0, description="accuracy only: a variant at most this many paired standard errors (same test "
                               "records) below the best is tied with it, and the smallest tied variant wins; "
                               "0: exact ties only")
    repeats: int = Field(5, ge=1, description="timed runs per speed measurement (median reported)")
    decode_tokens: int = Field(32, ge=2, description="tokens generated in the batch-1 decode timing")
    prefill_batch: int = Field(8, ge=1, description="sequences in the prefill timing")
    prefill_len: int = Field(64, ge=1, description="tokens per sequence in the prefill timing")
    register_model: bool = Field(True, description="log the champion as an MLflow model and register it as `quillan`")


def median_seconds(fn: Callable[[], object], min_reps: int = 5, max_reps: int | None = None,
                   budget_s: float = 0.0) -> float:
    """Median wall time (s) of `fn()` after one warm-up call: `min_reps` runs, more (up to
    `max_reps`) while the total stays under `budget_s`."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < (max_reps or min_reps) and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def prefill_tokens_per_s(model: Quillan, batch: int, length: int, repeats: int, seed: int = 0) -> float:
    """Tokens/s of one forward pass over (batch, length) random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.cfg.vocab_size, (batch, length), generator=g)
    return batch * length / median_seconds(lambda: model(ids), repeats)


@torch.no_grad()
def decode_tokens_per_s(model: Quillan, n_tokens: int, repeats: int, prompt_len: int = 16, seed: int = 0) -> float:
    """Batch-1 greedy decoding speed with the KV cache: (n − 1) / (t(n tokens) − t(1 token)), so the
    prompt's prefill is not counted."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.cfg.vocab_size, (1, prompt_len), generator=g)
    t_n = median_seconds(lambda: model.generate(ids, n_tokens, temperature=0.0), repeats)
    t_1 = median_seconds(lambda: model.generate(ids, 1, temperature=0.0), repeats)
    return (n_tokens - 1) / max(t_n - t_1, 1e-9)


def gate_failures(accuracy: dict[str, float], baseline: str, max_drop: float) -> dict[str, float]:
    """{variant: drop} for every variant whose accuracy is more than `max_drop` below the baseline's."""
    base = accuracy[baseline]
    return {v: base - a for v, a in accuracy.items() if v != baseline and base - a > max_drop}


def pick_champion(rows: dict[str, dict[str, float]], candidates: list[str], metric: str,
                  outcomes: dict[str, list[int]] | None = None, tolerance_se: float = 0.0) -> str | None:
    """The best candidate by `metric` (higher is better, except size_bytes), ties to the smaller.

    For `accuracy` with `outcomes` (0/1 per record, the same records in the same order for every
    candidate), a candidate whose accuracy is at most `tolerance_se` paired standard errors below
    the best's is tied with the best: exports of one network that differ by a few answers differ
    by rounding, not by quality, and the smaller export should not lose to noise.
    """
    if not candidates:
        return None
    sign = -1.0 if metric == "size_bytes" else 1.0
    best = min(candidates, key=lambda v: (-sign * rows[v][metric], rows[v]["size_bytes"], v))
    if metric != "accuracy" or outcomes is None or tolerance_se <= 0:
        return best

    def tied(v: str) -> bool:
        gap = rows[best]["accuracy"] - rows[v]["accuracy"]
        return gap <= tolerance_se * paired_standard_error(outcomes[v], outcomes[best])

    return min((v for v in candidates if tied(v)), key=lambda v: (rows[v]["size_bytes"], v))


def champion_rule(metric: str, tolerance_se: float) -> str:
    """`pick_champion`'s rule for these arguments, in words (for reports)."""
    if metric != "accuracy":
        return f"best {metric}; ties go to the smaller"
    if tolerance_se <= 0:
        return "best accuracy; exact ties go to the smaller"
    return f"the smallest passing variant within {tolerance_se:g} paired standard errors of the best accuracy on the same records"
