"""Lightning module behaviour on tiny data: learning, λ reaching layers, non-finite stops."""

import lightning as L
import pytest
import torch

from quillan.bitnet import BitLinear
from quillan.config import QuillanConfig
from quillan.data.generators import generate_tasks
from quillan.data.tokenizer import train_tokenizer, training_text
from quillan.train.config import TrainConfig
from quillan.train.data import TokenizedRecords
from quillan.train.lightning import LambdaWarmup, NonFiniteError, QuillanDataModule, QuillanLightning


@pytest.fixture(scope="module")
def tiny():
    rows = generate_tasks(12, seed=0)[:8]
    tok = train_tokenizer((training_text(r) for r in rows), vocab_size=300, min_frequency=1)
    return TokenizedRecords(rows, tok, 64, digit_order="msb"), tok.get_vocab_size()


def _fit(tiny, reference, steps=40, callbacks=(), **train_kw):
    data, vocab = tiny
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=5e-3, lr_warmup_steps=2, val_every=steps, val_batches=1,
                      log_every=1, warmup_frac=0.2, **train_kw)
    module = QuillanLightning(QuillanConfig.preset("smoke", vocab_size=vocab, diffusion_steps=0), cfg, seed=0,
                              reference=reference)
    losses = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl, out, batch, i):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    cbs = [Rec(), *callbacks] + ([] if reference else [LambdaWarmup(steps, cfg.warmup_frac, cfg.lambda_schedule)])
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=cbs,
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, datamodule=QuillanDataModule(data, data, cfg, seed=0))
    return module, losses


@pytest.mark.parametrize("reference", [False, True])
def test_loss_decreases_when_overfitting_one_batch(tiny, reference):
    module, losses = _fit(tiny, reference)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    layers = [m for m in module.model.modules() if isinstance(m, BitLinear)]
    if reference:
        assert all(not m.quantize and m.lam == 0.0 for m in layers)
    else:
        assert all(m.quantize and m.lam == 1.0 for m in layers)  # λ reached every BitLinear


def test_lambda_reaches_every_layer_during_warmup(tiny):
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl, out, batch, i):
            seen.append({m.lam for m in pl.model.modules() if isinstance(m, BitLinear)})

    _fit(tiny, False, steps=10, callbacks=[Probe()])
    assert all(len(s) == 1 for s in seen)  # every layer has the same λ at each step
    lams = [s.pop() for s in seen]
    assert lams[0] == 0.0 and lams[1] == pytest.approx(0.5) and lams[2:] == [1.0] * 8  # warmup 20 % of 10 steps


def test_non_finite_loss_stops_with_the_step(tiny):
    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl, batch, i):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl.model.embed.weight[0].fill_(float("nan"))

    with pytest.raises(NonFiniteError, match="at step 3"):
        _fit(tiny, False, steps=10, callbacks=[Poison()])


def test_hybrid_optimizer_trains_and_reports_its_choices(tiny):
    from quillan.train.hybrid import HybridTrustRegion

    module, losses = _fit(tiny, False, steps=30, optimizer="hybrid", hybrid={"clusters": 2})
    opt = module.optimizers().optimizer
    assert isinstance(opt, HybridTrustRegion) and opt.steps_done == 30
    assert set(opt.last) == {"lr_multiplier", "radius", "update_norm", "clipped", "advantage"}
    assert opt.last["update_norm"] <= opt.last["radius"] * (1 + 1e-6)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_muon_optimizer_trains_bitlinear_weights_and_adamw_the_rest(tiny):
    from quillan.bitnet import bit_linears
    from quillan.train.muon import MuonAdamW

    module, losses = _fit(tiny, False, optimizer="muon")
    opt = module.optimizers().optimizer
    assert isinstance(opt, MuonAdamW)
    muon_ids = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert muon_ids == {id(m.weight) for m in bit_linears(module.model)}
    everything = [p for g in opt.param_groups for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == len(list(module.model.parameters()))
    assert any(p is module.model.embed.weight for g in opt.adamw.param_groups for p in g["params"])
    assert all("momentum_buffer" in opt.state[p] for g in opt.param_groups if g["muon"] for p in g["params"])
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_prompt_loss_weight_adds_the_prompt_tokens_loss(tiny):
    """The step's loss is the answer CE + w·prompt CE + the auxiliary terms; both CEs are logged."""
    from quillan.train.data import prompt_labels

    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl, out, batch, i):
            b = trainer.datamodule.batch(trainer.global_step - 1)
            seen.append((float(out["loss"]), {k: float(v) for k, v in trainer.callback_metrics.items()
                                              if k.startswith("train/")}, b))

    _fit(tiny, True, steps=3, callbacks=[Probe()], prompt_loss_weight=0.5)
    loss, logged, batch = seen[0]
    aux = logged["train/total_loss"] - logged["train/loss"] - 0.5 * logged["train/prompt_loss"]
    assert logged["train/prompt_loss"] > 0 and abs(loss - logged["train/total_loss"]) < 1e-5
    assert 0 <= aux < 0.1  # the router terms, weighted 0.01 and 0.001
    assert int((prompt_labels(batch) != -100).sum()) > int((batch["labels"] != -100).sum())


def test_val_probe_is_logged_at_each_check_and_leaves_training_unchanged():
    """The greedy-accuracy probe runs at every validation check, its overall and per-domain values
    land in History's val rows, and the weights after training are the same bits as without it."""
    from quillan.inference import accuracy_by_domain
    from quillan.train.lightning import History

    rows = generate_tasks(12, seed=0)[:8]
    tok = train_tokenizer((training_text(r) for r in rows), vocab_size=300, min_frequency=1)
    data = TokenizedRecords(rows, tok, 64, digit_order="msb")
    cfg = TrainConfig(max_steps=10, batch_size=8, lr=5e-3, lr_warmup_steps=2, val_every=5, val_batches=1,
                      log_every=1, warmup_frac=0.2)
    calls = []

    def probe(model):
        calls.append(model.training)
        return accuracy_by_domain(model, tok, rows, 8)

    def fit(val_probe):
        module = QuillanLightning(QuillanConfig.preset("smoke", vocab_size=tok.get_vocab_size(), diffusion_steps=0),
                                  cfg, seed=0, val_probe=val_probe)
        history = History()
        trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            val_check_interval=5, check_val_every_n_epoch=None, limit_val_batches=1,
                            use_distributed_sampler=False,
                            callbacks=[history, LambdaWarmup(10, cfg.warmup_frac, cfg.lambda_schedule)])
        trainer.fit(module, datamodule=QuillanDataModule(data, data, cfg, seed=0))
        return module, history

    with_probe, history = fit(probe)
    without, plain = fit(None)
    assert calls == [False, False]  # twice (steps 5 and 10), the model in eval mode
    assert [r["step"] for r in history.val_rows] == [5.0, 10.0]
    domains = {r["domain"] for r in rows}
    for r in history.val_rows:
        assert set(r) == {"step", "val/loss", "val/accuracy", *(f"val/accuracy/{d}" for d in domains)}
        assert 0.0 <= r["val/accuracy"] <= 1.0
    assert all(set(r) == {"step", "val/loss"} for r in plain.val_rows)
    assert [r["val/loss"] for r in history.val_rows] == [r["val/loss"] for r in plain.val_rows]
    for (name, a), b in zip(with_probe.model.state_dict().items(), without.model.state_dict().values()):
        assert torch.equal(a, b), name
