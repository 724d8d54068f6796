"""A byte-level BPE tokenizer trained locally with HF `tokenizers`, digits one per token.

Splitting digits individually (as LLaMA does) lets a small model learn place-value
arithmetic instead of memorising multi-digit tokens.
"""

from __future__ import annotations

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
