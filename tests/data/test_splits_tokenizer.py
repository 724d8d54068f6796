from collections import Counter
import pytest

from quillan.data import DataConfig, build_dataset
from quillan.data.filters import normalize_text
from quillan.data.generators import generate_tasks
from quillan.data.splits import split_records
from quillan.data.tokenizer import (decode_text, digit_token_ids, model_text, special_ids, train_tokenizer,
                                    training_text)


def test_splits_disjoint_stratified_and_complete():
    rows = generate_tasks(300, seed=2)
    rows.append(dict(rows[0]))  # a repeated prompt must land in one split only
    splits = split_records(rows, val_frac=0.1, test_frac=0.1, seed=0)
    keys = {name: {normalize_text(r["prompt"]) for r in part} for name, part in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert sum(len(p) for p in splits.values()) == len(rows)
    per_cell = Counter((r["domain"], r["difficulty"]) for r in splits["test"])
    assert len(per_cell) == 12 and max(per_cell.values()) - min(per_cell.values()) <= 2


def test_tokenizer_splits_digits_one_per_token_and_round_trips():
    rows = generate_tasks(150, seed=0)
    tok = train_tokenizer((training_text(r) for r in rows), vocab_size=400)
    enc = tok.encode("What is 1234 + 56?")
    digits = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert digits == ["1", "2", "3", "4", "5", "6"]
    assert tok.decode(enc.ids) == "What is 1234 + 56?"
    assert special_ids(tok) == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    assert tok.get_vocab_size() <= 400


def test_model_text_reverses_each_digit_run_and_is_its_own_inverse():
    text = "Compute 778 plus 457.\nrev 5321\nAnswer: 1235 ([3, 14][0]) -20 x1y"
    lsb = model_text(text, "lsb")
    assert lsb == "Compute 877 plus 754.\nrev 1235\nAnswer: 5321 ([3, 41][0]) -02 x1y"
    assert model_text(lsb, "lsb") == text and model_text(text, "msb") == text
    with pytest.raises(ValueError, match="digit_order"):
        model_text(text, "reversed")


def test_digit_token_ids_and_decode_text_in_lsb_order():
    tok = train_tokenizer(["What is 12 + 3456?"] * 3, vocab_size=300)
    ids = digit_token_ids(tok)
    assert [tok.id_to_token(i) for i in ids] == [str(d) for d in range(10)]
    model_ids = tok.encode(model_text("Answer: 1235", "lsb")).ids
    assert decode_text(tok, model_ids, "lsb") == "Answer: 1235"


def test_build_dataset_tokenizer_trained_on_train_only_and_deterministic():
    cfg = DataConfig(n_per_domain=90, vocab_size=320, max_tokens=4096)  # no row dropped for length
    a, b = build_dataset(cfg, seed=0), build_dataset(cfg, seed=0)
    assert a.splits == b.splits
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    assert all(r["n_tokens"] <= cfg.max_tokens for part in a.splits.values() for r in part)
    assert a.report.as_dict()["kept"] == sum(len(p) for p in a.splits.values())
    # The tokenizer is the one trained on the train split's texts, not on all of them.
    texts = {name: [training_text(r) for r in part] for name, part in a.splits.items()}
    from_train = train_tokenizer(texts["train"], cfg.vocab_size, cfg.tokenizer_min_frequency)
    from_all = train_tokenizer(texts["train"] + texts["val"] + texts["test"], cfg.vocab_size,
                               cfg.tokenizer_min_frequency)
    assert a.tokenizer.to_str() == from_train.to_str() != from_all.to_str()
