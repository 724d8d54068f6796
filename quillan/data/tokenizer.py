"""A byte-level BPE tokenizer trained locally with HF `tokenizers`, digits one per token.

Splitting digits individually (as LLaMA does) lets a small model learn place-value
arithmetic instead of memorising multi-digit tokens.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
SEP = "\n"  # between prompt and target


def prompt_text(record: dict[str, Any]) -> str:
    """What the model is conditioned on: the prompt and the separator."""
    return record["prompt"] + SEP


def training_text(record: dict[str, Any]) -> str:
    """The full training string of a record: prompt, separator, target."""
    return prompt_text(record) + record["target"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """BPE over bytes with individually split digits; ids 0..3 are the special tokens."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens, e.g. {"pad": 0, "bos": 1, "eos": 2, "unk": 3}."""
    return {name.strip("<>"): tok.token_to_id(name) for name in SPECIAL_TOKENS}


_DIGIT_RUN = re.compile(r"[0-9]+")


def model_text(text: str, digit_order: str = "msb") -> str:
    """`text` as the model reads and writes it. `lsb`: each maximal run of ASCII digits reversed
    (`"778 + 457 = 1235"` → `"877 + 754 = 5321"`), so every number starts at its units digit and
    the causal digit index of an Abacus embedding is the digit's place value (McLeish et al. 2024,
    arXiv 2405.17399, §3, who reverse the operands for the same reason). The map is its own
    inverse: decoded model output goes through it once more."""
    if digit_order == "msb":
        return text
    if digit_order != "lsb":
        raise ValueError(f"digit_order must be msb or lsb, got {digit_order!r}")
    return _DIGIT_RUN.sub(lambda m: m.group(0)[::-1], text)


def decode_text(tok: Tokenizer, ids: list[int], digit_order: str) -> str:
    """The text of generated token ids, numbers back in the order a person writes them."""
    return model_text(tok.decode(ids), digit_order)


def digit_token_ids(tok: Tokenizer) -> tuple[int, ...]:
    """Ids of the single-digit tokens "0".."9" (this tokenizer splits digits individually)."""
    ids = tuple(tok.token_to_id(str(d)) for d in range(10))
    if None in ids:
        raise ValueError(f"tokenizer lacks single-digit tokens: {[str(d) for d, i in enumerate(ids) if i is None]}")
    return ids
