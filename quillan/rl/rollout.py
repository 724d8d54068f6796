"""Rollouts for GRPO: sample G completions per prompt with the KV-cache `generate`, score them
with the task verifiers, and pack kept groups into padded tensors for the policy update.

Shapes: N sequences (= groups × G), W prompt width (left-padded), C completion width
(right-padded; the <eos> that ends a completion is part of it and carries loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from quillan.data.tokenizer import decode_text, prompt_text, special_ids
from quillan.data.verify import ANSWER_MARK, extract_answer, is_correct
from quillan.inference import encode_prompts, left_padded, until_eos
from quillan.model import Quillan
from quillan.rl.config import RewardWeights
from quillan.rl.grpo import multi_objective_reward, overlong_penalty


@dataclass
class Group:
    """One prompt and its G sampled completions with their rewards (R and its parts, each (G,))."""

    record: dict[str, Any]
    prompt: list[int]                 # <bos> + prompt tokens
    completions: list[list[int]]      # each ends with <eos> unless truncated at the budget
    texts: list[str]
    rewards: torch.Tensor             # total reward R
    correct: torch.Tensor
    format_ok: torch.Tensor
    error: torch.Tensor
    overlong: torch.Tensor


def reward_parts(record: dict[str, Any], text: str, finished: bool) -> tuple[float, float, float]:
    """(R_correct, R_format, R_error) of one completion.

    correct: exact match of the extracted answer (the task's verifier); format: the completion
    ended with <eos>, and says "Answer:" where the task's target does; error: the answer is empty.
    """
    correct = float(is_correct(record, text))
    fmt = float(finished and (ANSWER_MARK not in record["target"] or ANSWER_MARK in text))
    error = float(extract_answer(text) == "")
    return correct, fmt, error


@torch.no_grad()
def sample_groups(model: Quillan, tokenizer: Tokenizer, records: list[dict[str, Any]], group_size: int, *,
                  max_new_tokens: int, temperature: float, top_k: int | None, weights: RewardWeights,
                  overlong_cache: int, generator: torch.Generator) -> list[Group]:
    """G completions for each record (one batched `generate` over len(records)·G rows), scored."""
    sp = special_ids(tokenizer)
    eos = sp["eos"]
    was_training = model.training
    model.eval()
    room = model.cfg.max_seq_len - max_new_tokens
    prompts = encode_prompts(tokenizer, [prompt_text(r) for r in records], room, digit_order=model.cfg.digit_order)
    rows = [p for p in prompts for _ in range(group_size)]
    input_ids, mask = left_padded(rows, sp["pad"])
    seq = model.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos,
                         attention_mask=mask, generator=generator)
    model.train(was_training)
    groups = []
    gen = seq[:, input_ids.shape[1]:].tolist()
    for i, rec in enumerate(records):
        comps, texts, parts = [], [], []
        for row in gen[i * group_size : (i + 1) * group_size]:
            body = until_eos(row, eos)
            finished = len(body) < len(row)
            comps.append(body + [eos] if finished else body)
            texts.append(decode_text(tokenizer, body, model.cfg.digit_order))
            parts.append(reward_parts(rec, texts[-1], finished))
        correct, fmt, error = (torch.tensor(p) for p in zip(*parts))
        lengths = torch.tensor([len(c) for c in comps])
        over = overlong_penalty(lengths, max_new_tokens, overlong_cache) if overlong_cache else torch.zeros(group_size)
        total = multi_objective_reward(correct, fmt, error, weights.correct, weights.format, weights.error) + over
        groups.append(Group(rec, prompts[i], comps, texts, total, correct, fmt, error, over))
    return groups


def pack_groups(groups: list[Group], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for the update: `input_ids`, `attention_mask` (N, W + C) with prompts left-padded
    to W and completions right-padded to C; `completion_mask` (N, C), 1 on completion tokens;
    `rewards` (N,). Row g·G + j is completion j of group g."""
    prompts = [g.prompt for g in groups for _ in g.completions]
    comps = [c for g in groups for c in g.completions]
    p_ids, p_mask = left_padded(prompts, pad_id)
    C = max(1, max(len(c) for c in comps))
    c_ids = torch.full((len(comps), C), pad_id, dtype=torch.long)
    c_mask = torch.zeros_like(c_ids)
    for i, c in enumerate(comps):
        if c:
            c_ids[i, : len(c)] = torch.tensor(c)
            c_mask[i, : len(c)] = 1
    return {"input_ids": torch.cat([p_ids, c_ids], 1), "attention_mask": torch.cat([p_mask, c_mask], 1),
            "completion_mask": c_mask, "rewards": torch.cat([g.rewards for g in groups]).float()}


def completion_logprobs(model: Quillan, batch: dict[str, torch.Tensor], temperature: float = 1.0
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Log-probabilities (N, C) of the completion tokens under `model` at the sampling temperature,
    and the overseer weights α per council layer at the positions that predict them (N, C, M)."""
    C = batch["completion_mask"].shape[1]
    out = model(batch["input_ids"], batch["attention_mask"])
    logits = out.logits[:, -C - 1 : -1].float() / temperature
    targets = batch["input_ids"][:, -C:]
    logp = torch.gather(F.log_softmax(logits, -1), 2, targets[..., None]).squeeze(-1)
    return logp, [a[:, -C - 1 : -1] for a in out.council_probs]
