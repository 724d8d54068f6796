"""Text in, text out: batched greedy/sampled completion with a Quillan model and its tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from quillan.data.tokenizer import special_ids
from quillan.model import Quillan


@torch.no_grad()
def complete(model: Quillan, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 48,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             batch_size: int = 32, seed: int = 0) -> list[str]:
    """Completion text of each prompt (already formatted, e.g. by `prompt_text`), cut at <eos>.

    Prompts are left-padded per batch. Deterministic for a given seed.
    """
    ids = special_ids(tokenizer)
    bos, eos, pad = ids["bos"], ids["eos"], ids["pad"]
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    room = model.cfg.max_seq_len - max_new_tokens
    for start in range(0, len(prompts), batch_size):
        enc = [[bos] + e.ids for e in tokenizer.encode_batch(prompts[start : start + batch_size])]
        enc = [e[-room:] for e in enc]  # keep the prompt's end if it is too long
        width = max(len(e) for e in enc)
        input_ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, e in enumerate(enc):
            input_ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        seq = model.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_id=eos, attention_mask=mask, generator=gen)
        for row in seq[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode(row))
    return out
