"""Resumable checkpoints are kept only when made from the same params and inputs: the train
stage's stamp (`_prepare_checkpoints`) and the grpo stage's state (`_resume`), on a scratch
checkpoint directory."""

import json

import tasks.grpo
import tasks.train


def test_train_discards_checkpoints_stamped_with_another_fingerprint(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "checkpoints"
    monkeypatch.setattr(tasks.train, "CKPT_DIR", ckpt)
    (ckpt / "ternary").mkdir(parents=True)
    (ckpt / "ternary" / "last.ckpt").write_bytes(b"state")
    (ckpt / "fingerprint.json").write_text(json.dumps({"fingerprint": "same"}))
    tasks.train._prepare_checkpoints("same")
    assert (ckpt / "ternary" / "last.ckpt").read_bytes() == b"state"  # same params: kept for resuming
    assert "discarding" not in capsys.readouterr().out
    tasks.train._prepare_checkpoints("other")
    assert "train: discarding checkpoints made with other params or data" in capsys.readouterr().out
    assert not (ckpt / "ternary").exists()
    assert json.loads((ckpt / "fingerprint.json").read_text()) == {"fingerprint": "other"}
    (ckpt / "fingerprint.json").unlink()
    (ckpt / "ternary").mkdir()
    tasks.train._prepare_checkpoints("other")  # no stamp at all: nothing says what made them
    assert not (ckpt / "ternary").exists()


def test_grpo_discards_a_checkpoint_made_from_other_params(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "checkpoints"
    monkeypatch.setattr(tasks.grpo, "CKPT_DIR", ckpt)
    (ckpt / "last").mkdir(parents=True)
    (ckpt / "last" / "state.json").write_text(json.dumps({"fingerprint": "old", "step": 3, "history": []}))
    # A mismatched fingerprint never touches the trainer: it starts from step 0.
    assert tasks.grpo._resume(trainer=None, fp="new") == (0, [])
    assert "grpo: discarding checkpoints made with other params or inputs" in capsys.readouterr().out
    assert not ckpt.exists()
    assert tasks.grpo._resume(trainer=None, fp="new") == (0, [])  # nothing there: a fresh start, silently
    assert "discarding" not in capsys.readouterr().out
