"""Text in, text out: batched greedy/sampled completion with a Quillan model and its tokenizer,
and greedy exact-match accuracy on verifiable records."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Callable

import torch
from tokenizers import Tokenizer

from quillan.data.tokenizer import decode_text, model_text, prompt_text, special_ids
from quillan.data.verify import extract_answer, is_correct, normalize_answer
from quillan.model import Quillan


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` (B, W) for token rows, left-padded to the longest (W)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return input_ids, mask


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], room: int, *, digit_order: str) -> list[list[int]]:
    """`<bos> + tokens` of each (formatted) prompt as the model reads it (`model_text`), keeping
    its last `room` tokens if longer."""
    bos = special_ids(tokenizer)["bos"]
    return [([bos] + e.ids)[-room:] for e in tokenizer.encode_batch([model_text(p, digit_order) for p in prompts])]


def until_eos(row: list[int], eos: int) -> list[int]:
    """The tokens of a generated row before its first <eos>."""
    return row[: row.index(eos)] if eos in row else row


@torch.no_grad()
def complete(model: Quillan, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 48,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             batch_size: int = 32, seed: int = 0) -> list[str]:
    """Completion text of each prompt (already formatted, e.g. by `prompt_text`), cut at <eos>.

    Prompts are left-padded per batch. Deterministic for a given seed.
    """
    ids = special_ids(tokenizer)
    eos, pad = ids["eos"], ids["pad"]
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    room = model.cfg.max_seq_len - max_new_tokens
    for start in range(0, len(prompts), batch_size):
        input_ids, mask = left_padded(encode_prompts(tokenizer, prompts[start : start + batch_size], room,
                                                     digit_order=model.cfg.digit_order), pad)
        seq = model.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_id=eos, attention_mask=mask, generator=gen)
        out += [decode_text(tokenizer, until_eos(row, eos), model.cfg.digit_order)
                for row in seq[:, input_ids.shape[1]:].tolist()]
    return out


def task_of(record: dict[str, Any]) -> str:
    """A record's task family, e.g. `reasoning/greater` (its domain if it names no task)."""
    return f"{record['domain']}/{record.get('task', record['domain'])}"


def wilson_interval(correct: int, count: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial share (Wilson 1927): (low, high) in [0, 1]."""
    if count == 0:
        return 0.0, 1.0
    p, n = correct / count, count
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_standard_error(before: list[int], after: list[int]) -> float:
    """Standard error of the change in accuracy between two models scored on the same records:
    that of the mean of d_i = after_i − before_i (0/1 outcomes), sqrt(var(d)/n) with the sample
    variance. Records both models get right or wrong add nothing, so it is far smaller than the
    error of two independent samples. 0 for fewer than two records."""
    n = len(before)
    if n != len(after):
        raise ValueError(f"{n} outcomes before, {len(after)} after: not the same records")
    if n < 2:
        return 0.0
    d = [a - b for a, b in zip(after, before)]
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def _shares(hits: dict[str, list]) -> dict[str, float]:
    return {k: h[0] / h[1] for k, h in sorted(hits.items())}


def accuracy_by_domain(model: Quillan, tokenizer: Tokenizer, records: list[dict[str, Any]],
                       max_new_tokens: int = 64, batch_size: int = 256,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Greedy exact-match accuracy (share in [0, 1]) over `records`, overall, per domain, per task
    family and per difficulty.

    Records are sorted by prompt length first so that batches pad little; the result does not
    depend on the order. Batches of 256 decode 1.7× as many records per second as batches of 64
    (the cpu preset's model, 96 new tokens, one core: 22.2 against 12.9 records/s). `progress(n)` is called after each batch with its size.
    Returns {"accuracy", "correct", "count", "interval95": [low, high], "by_domain": {domain: acc},
    "by_task": {family: acc}, "by_difficulty": {"1": acc, ...}, "task_counts": {family: n},
    "outcomes": [0/1 per record, in the order given]} (outcomes pair two evaluations record by record).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(records)), key=lambda i: (len(records[i]["prompt"]), i))
    hits: dict[str, dict[str, list[int]]] = {k: defaultdict(lambda: [0, 0]) for k in ("domain", "task", "difficulty")}
    outcomes = [0] * len(records)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [records[i] for i in idx]
        texts = complete(model, tokenizer, [prompt_text(r) for r in batch], max_new_tokens, batch_size=len(batch))
        for i, rec, text in zip(idx, batch, texts):
            ok = outcomes[i] = int(is_correct(rec, text))
            for kind, key in (("domain", rec["domain"]), ("task", task_of(rec)),
                              ("difficulty", str(rec.get("difficulty", "")))):
                hits[kind][key][0] += ok
                hits[kind][key][1] += 1
        if progress is not None:
            progress(len(batch))
    model.train(was_training)
    correct = sum(h[0] for h in hits["domain"].values())
    count = sum(h[1] for h in hits["domain"].values())
    return {"accuracy": correct / max(count, 1), "correct": correct, "count": count,
            "interval95": list(wilson_interval(correct, count)), "by_domain": _shares(hits["domain"]),
            "by_task": _shares(hits["task"]), "by_difficulty": _shares(hits["difficulty"]),
            "task_counts": {k: h[1] for k, h in sorted(hits["task"].items())}, "outcomes": outcomes}


def pass_at_k(model: Quillan, tokenizer: Tokenizer, records: list[dict[str, Any]], k: int, temperature: float,
              max_new_tokens: int = 64, top_k: int | None = None, seed: int = 0, batch_size: int = 256,
              progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """pass@1 (sampled), pass@k and maj@k over `records`: k completions per prompt at `temperature`;
    pass@k is the share of prompts with at least one correct completion (n = k samples, so
    Chen et al. 2021's unbiased estimator 1 − C(n−c, k)/C(n, k) reduces to this), pass@1 the
    mean share of correct completions, maj@k the share whose majority answer (`majority_answer`)
    is correct. Overall and per task family; deterministic for a seed.

    maj@k is what sharpening the sampled distribution towards its mode reaches (Huang et al. 2024,
    arXiv 2412.01951); pass@k bounds what RL with a verifier finds among the model's own samples
    (Yue et al. 2025, arXiv 2504.13837); a pass@k near `prior_pass_at_k` is guessing, not headroom.
    Returns {"k", "temperature", "pass_at_1", "pass_at_k", "maj_at_k",
    "by_task": {family: {"pass_at_1", "pass_at_k", "maj_at_k", "n"}}} (names MLflow accepts as
    metric keys: no "@")."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(records)), key=lambda i: (len(records[i]["prompt"]), i))
    rows = [records[i] for i in order for _ in range(k)]
    per_batch = max(k, batch_size // k * k)  # whole groups per batch
    texts: list[str] = []
    for start in range(0, len(rows), per_batch):
        batch = rows[start : start + per_batch]
        texts += complete(model, tokenizer, [prompt_text(r) for r in batch], max_new_tokens, temperature=temperature,
                          top_k=top_k, batch_size=len(batch), seed=seed + start)
        if progress is not None:
            progress(len(batch) // k)
    model.train(was_training)
    # per family: correct samples, prompts solved, prompts whose majority answer is right, prompts
    fams: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for j, i in enumerate(order):
        group = texts[j * k : (j + 1) * k]
        c = sum(int(is_correct(records[i], t)) for t in group)
        f = fams[task_of(records[i])]
        f[0] += c
        f[1] += int(c > 0)
        f[2] += int(is_correct(records[i], majority_answer(group)))
        f[3] += 1
    n = max(len(records), 1)
    return {"k": k, "temperature": temperature,
            "pass_at_1": sum(f[0] for f in fams.values()) / (n * k), "pass_at_k": sum(f[1] for f in fams.values()) / n,
            "maj_at_k": sum(f[2] for f in fams.values()) / n,
            "by_task": {t: {"pass_at_1": f[0] / (f[3] * k), "pass_at_k": f[1] / f[3], "maj_at_k": f[2] / f[3], "n": f[3]}
                        for t, f in sorted(fams.items())}}


def majority_answer(completions: list[str]) -> str:
    """The answer most of `completions` give (`extract_answer`, compared as `normalize_answer`
    does); a tie goes to the answer given first. Self-consistency's vote (Wang et al. 2023,
    arXiv 2203.11171)."""
    votes = Counter(normalize_answer(extract_answer(c)) for c in completions)
    return votes.most_common(1)[0][0] if votes else ""  # most_common keeps first-seen order in a tie


def prior_pass_at_k(train: list[dict[str, Any]], records: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """pass@k of guessing: each of k answers drawn from the family's training answer distribution,
    so a record with answer y is solved with probability 1 − (1 − p(y))^k. Where the model's pass@k
    is near this, its samples find the answer by trying the few answers the family has (counts,
    yes/no), not by solving. Returns {"pass_at_k", "by_task": {family: pass@k}} (mean over records)."""
    answers = training_answers(train)
    hits: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for r in records:
        seen = answers[task_of(r)]
        p = seen[normalize_answer(r["answer"])] / max(sum(seen.values()), 1)
        h = hits[task_of(r)]
        h[0] += 1.0 - (1.0 - p) ** k
        h[1] += 1
    return {"pass_at_k": sum(h[0] for h in hits.values()) / max(len(records), 1), "by_task": _shares(hits)}


def training_answers(train: list[dict[str, Any]]) -> defaultdict[str, Counter]:
    """How often each answer (as `normalize_answer` compares it) occurs per task family in `train`."""
    answers: defaultdict[str, Counter] = defaultdict(Counter)
    for r in train:
        answers[task_of(r)][normalize_answer(r["answer"])] += 1
    return answers


def prior_baseline(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, float]:
    """What guessing scores: per task family, the test accuracy of always answering that family's
    most frequent training answer (ties to the smaller string), and "overall" across families."""
    guess = {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in training_answers(train).items()}
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in test:
        h = hits[task_of(r)]
        h[0] += int(task_of(r) in guess and is_correct(r, guess[task_of(r)]))
        h[1] += 1
    out = _shares(hits)
    out["overall"] = sum(h[0] for h in hits.values()) / max(sum(h[1] for h in hits.values()), 1)
    return out
