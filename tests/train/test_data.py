import pytest

from quillan.data.generators import generate_tasks
from quillan.data.tokenizer import train_tokenizer, training_text
from quillan.train.data import IGNORE, StepBatchSampler, TokenizedRecords, collate, prompt_labels


def test_labels_cover_target_and_eos_only():
    rows = generate_tasks(30, seed=0)
    tok = train_tokenizer((training_text(r) for r in rows), vocab_size=320)
    ds = TokenizedRecords(rows[:2], tok, max_len=128, digit_order="msb")
    batch = collate([ds[0], ds[1]], ds.pad_id)
    ids, n_prompt = ds[0]
    target = tok.encode(rows[0]["target"]).ids + [tok.token_to_id("<eos>")]
    labels = batch["labels"][0]
    assert labels[labels != IGNORE].tolist() == target
    # label at position t is the token at t+1: the first supervised position is the last prompt token
    assert int((labels != IGNORE).nonzero()[0]) == n_prompt - 1
    assert batch["attention_mask"][0].sum() == len(ids)
    assert batch["input_ids"].shape[1] == max(len(ds[0][0]), len(ds[1][0]))


def test_prompt_labels_cover_the_prompt_only():
    """Position t predicts token t + 1 for t + 1 in the prompt (after <bos>); answer positions and
    padding carry no prompt label, and the two label sets never overlap."""
    rows = generate_tasks(30, seed=0)
    tok = train_tokenizer((training_text(r) for r in rows), vocab_size=320)
    ds = TokenizedRecords(rows[:3], tok, max_len=128, digit_order="msb")
    batch = collate([ds[0], ds[1], ds[2]], ds.pad_id)
    pl = prompt_labels(batch)
    for i in range(3):
        ids, n_prompt = ds[i]
        assert pl[i][pl[i] != IGNORE].tolist() == ids[1:n_prompt]
        assert (pl[i, : n_prompt - 1] != IGNORE).all() and (pl[i, n_prompt - 1 :] == IGNORE).all()
    assert not ((pl != IGNORE) & (batch["labels"] != IGNORE)).any()


def test_step_batches_are_a_function_of_the_step():
    s = StepBatchSampler(n=100, batch_size=10, total_steps=50, seed=3)
    again = StepBatchSampler(n=100, batch_size=10, total_steps=50, seed=3, start_step=20)
    assert list(again)[0] == s.batch_indices(20)
    epoch0 = [i for step in range(10) for i in s.batch_indices(step)]
    assert sorted(epoch0) == list(range(100))  # an epoch sees every row once
    assert s.batch_indices(10) != s.batch_indices(0)  # a new permutation per epoch


def test_ranks_split_the_global_batch():
    full = StepBatchSampler(n=64, batch_size=8, total_steps=5, seed=0).batch_indices(2)
    r0 = StepBatchSampler(n=64, batch_size=8, total_steps=5, seed=0, rank=0, world_size=2).batch_indices(2)
    r1 = StepBatchSampler(n=64, batch_size=8, total_steps=5, seed=0, rank=1, world_size=2).batch_indices(2)
    assert sorted(r0 + r1) == sorted(full) and not set(r0) & set(r1)
    with pytest.raises(ValueError, match="larger than the dataset"):
        StepBatchSampler(n=4, batch_size=8, total_steps=5, seed=0)


def test_tokens_by_step_counts_the_drawn_batches():
    from quillan.train.config import TrainConfig
    from quillan.train.data import step_sampler, tokens_by_step

    rows = generate_tasks(30, seed=0)
    tok = train_tokenizer((training_text(r) for r in rows), vocab_size=320)
    ds = TokenizedRecords(rows, tok, max_len=128, digit_order="msb")
    per_epoch = len(ds) // 8
    total = sum(len(ids) for ids, _ in ds.items)
    assert len(ds) == 120  # divisible by the batch: one epoch sees every row exactly once
    sampler = step_sampler(ds, TrainConfig(batch_size=8, max_steps=2 * per_epoch, lr_warmup_steps=0), seed=0)
    cumulative = tokens_by_step(ds, sampler, per_epoch)
    assert len(cumulative) == per_epoch + 1 and cumulative[0] == 0 and cumulative[-1] == total
    assert all(b > a for a, b in zip(cumulative, cumulative[1:]))  # every step draws tokens
    assert tokens_by_step(ds, sampler, 2 * per_epoch)[-1] > total  # the second epoch adds to the first
