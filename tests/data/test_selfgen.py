from pathlib import Path

import torch

from quillan.checkpoint import load_model_dir, save_model_dir
from quillan.config import QuillanConfig
from quillan.data import DataConfig, SelfGenConfig, build_dataset
from quillan.data.generators import generate_tasks
from quillan.data.tokenizer import train_tokenizer, training_text
from quillan.model import Quillan
from tasks.selfgen import completer_from_checkpoint


def test_self_generated_samples_kept_only_when_they_verify():
    cfg = DataConfig(n_per_domain=30, vocab_size=320, self_generate=SelfGenConfig(samples_per_domain=12))
    calls = []

    def half_right(prompts):  # a stand-in model: right on even indices, wrong on odd
        calls.append(len(prompts))
        from quillan.data.generators import generate_tasks as g
        truth = g(12, 0 + 7919, cfg.math_steps_frac)
        return [r["answer"] if i % 2 == 0 else r["answer"] + "0" for i, r in enumerate(truth)]

    ds = build_dataset(cfg, seed=0, complete=half_right)
    assert calls == [48]
    rows = [r for part in ds.splits.values() for r in part if r["source"] == "self"]
    from quillan.data.verify import verify_record

    assert ds.report.dropped["failed_verifier"] >= 20  # wrong answers rejected (a few go as duplicates first)
    assert 0 < len(rows) <= 24 and all(verify_record(r) for r in rows)


def test_completer_from_a_real_model_directory(tmp_path: Path):
    rows = generate_tasks(30, seed=0)
    tok = train_tokenizer((training_text(r) for r in rows), vocab_size=320)
    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke", vocab_size=tok.get_vocab_size()))
    save_model_dir(tmp_path / "m", model, tok)
    loaded, tok2 = load_model_dir(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    run = completer_from_checkpoint(tmp_path / "m", SelfGenConfig(checkpoint=str(tmp_path / "m"),
                                                                  samples_per_domain=1, max_new_tokens=5), seed=0)
    outs = run(["What is 2 + 2?", "Reverse the word 'cat'."])
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert run(["What is 2 + 2?", "Reverse the word 'cat'."]) == outs  # deterministic for a seed
