"""Stage `train`: Lightning training of the BitNet-MoE with the gradual λ warmup, and (optionally)
a full-precision reference on the same data and steps.

Outputs: models/train/ (model.safetensors, config.json, tokenizer.json, train.json and
reference/ when trained), metrics/train.json, plots/train_*.png and plots/train_*.csv.
Checkpoints go to models/train/checkpoints/ every `train.checkpoint_every` steps (written
atomically); a re-run with the same inputs resumes from them and ends with the same weights.
They are removed when the stage succeeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer

from quillan.checkpoint import load_model_dir, save_model_dir
from quillan.config import QuillanConfig
from quillan.machine import usable_cores
from quillan.model import Quillan
from quillan.train.config import TrainConfig
from quillan.train.data import TokenizedRecords, step_sampler, tokens_by_step
from quillan.train.evaluate import VAL_ACCURACY, evaluate_loss
from tasks.common import PLOTS_DIR, ROOT, atomic_path, read_jsonl, write_json, write_metrics, write_text
from tasks.params import Params
from tasks.tracking import file_md5, stage_run, tracking_uri

OUT_DIR = ROOT / "models" / "train"
CKPT_DIR = OUT_DIR / "checkpoints"
DATA = ROOT / "data" / "generated"
TOKENIZER = ROOT / "data" / "tokenizer.json"


class TrainingFailed(RuntimeError):
    """Training stopped (non-finite loss or gradient); the message says where and what was kept."""


FAILURES = (TrainingFailed,)


def _rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) + int(os.environ.get("NODE_RANK", "0"))


def fingerprint(params: Params) -> str:
    """What a resumable checkpoint must agree with: config and input data bytes."""
    blob = json.dumps({"seed": params.seed, "model": params.model.model_dump(), "quant": params.quant.model_dump(),
                       "train": params.train.model_dump(),
                       "data": [file_md5(DATA / "train.jsonl"), file_md5(TOKENIZER)]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_checkpoints(fp: str) -> None:
    """Keep checkpoints only if they were made from the same config and data."""
    stamp = CKPT_DIR / "fingerprint.json"
    if CKPT_DIR.exists() and (not stamp.exists() or json.loads(stamp.read_text()).get("fingerprint") != fp):
        print("train: discarding checkpoints made with other params or data")
        shutil.rmtree(CKPT_DIR)
    if _rank() == 0:
        CKPT_DIR.mkdir(parents=True, exist_ok=True)
        write_json(stamp, {"fingerprint": fp})


def _atomic_checkpoint_callback(directory: Path, every: int, max_steps: int):
    import lightning as L

    class AtomicCheckpoint(L.Callback):
        """Full training state every `every` steps as last.ckpt, via a temp file and a rename."""

        # At the *start* of step s the optimizer, LR scheduler and progress counters have all
        # finished step s-1; saving at the end of a batch would catch the scheduler one step behind.
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            step = trainer.global_step
            if step == 0 or step % every or step >= max_steps:
                return
            tmp = directory / "last.ckpt.tmp"
            trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizer, loops, callbacks
            if trainer.is_global_zero:
                os.replace(tmp, directory / "last.ckpt")
            trainer.strategy.barrier()

    return AtomicCheckpoint()


def lightning_strategy(name: str):
    """Lightning strategy for a params name. DDP must look for unused parameters: on any one
    rank, experts no token was routed to get no gradient, and plain DDP would wait forever."""
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    return name


def cpu_processes_threads(cfg: TrainConfig) -> None:
    """With several CPU processes (DDP), give each its share of the cores, whatever OMP_NUM_THREADS
    the caller set: OpenMP threads spinning at barriers while another process holds their core made
    steps ~15× slower (README "The model learns its tasks"). Child processes inherit the setting."""
    if cfg.accelerator != "cpu" or cfg.devices * cfg.num_nodes == 1:
        return
    threads = max(1, usable_cores() // cfg.devices)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def initial_model(params: Params, model_cfg: QuillanConfig) -> torch.nn.Module:
    """The ternary model as training started (QuillanLightning's seeded init, or init_checkpoint)."""
    if params.train.init_checkpoint:
        return load_model_dir(Path(params.train.init_checkpoint))[0]
    torch.manual_seed(params.seed)
    return Quillan(model_cfg)


def val_probe(params: Params, tokenizer: Tokenizer):
    """Greedy accuracy on `train.val_accuracy_size` stratified val records (the benchmark's
    decoding budget), run at every validation check; None when the size is 0."""
    n = params.train.val_accuracy_size
    if not n:
        return None
    from quillan.data.splits import stratified_sample
    from quillan.inference import accuracy_by_domain

    records = stratified_sample(read_jsonl(DATA / "val.jsonl"), n, params.seed)
    budget = params.benchmark.eval_max_new_tokens
    return lambda model: accuracy_by_domain(model, tokenizer, records, budget)


def fit_one(name: str, params: Params, model_cfg: QuillanConfig, train_set, val_set, run_id: str | None,
            reference: bool, probe=None) -> tuple[torch.nn.Module, dict]:
    """Train one model (resuming from its checkpoint if any); returns (model, history)."""
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger

    from quillan.train.lightning import (History, LambdaWarmup, NonFiniteError, QuillanDataModule,
                                         QuillanLightning)

    cfg: TrainConfig = params.train
    ckpt_dir = CKPT_DIR / name
    done_dir = ckpt_dir / "done"
    if (done_dir / "model.safetensors").exists():  # finished before an interruption of the other model
        model, _ = load_model_dir(done_dir)
        print(f"train: {name} already finished, loaded from {done_dir.relative_to(ROOT)}")
        return model, json.loads((done_dir / "history.json").read_text())
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    cpu_processes_threads(cfg)
    init_state = None
    if cfg.init_checkpoint:
        init_state = load_model_dir(Path(cfg.init_checkpoint))[0].state_dict()
    module = QuillanLightning(model_cfg, cfg, params.seed, reference=reference, init_state=init_state,
                              val_probe=probe)
    history = History()
    callbacks = [history, _atomic_checkpoint_callback(ckpt_dir, cfg.checkpoint_every, cfg.max_steps)]
    if not reference:
        callbacks.append(LambdaWarmup(cfg.max_steps, cfg.warmup_frac, cfg.lambda_schedule))
    logger = False
    if run_id is not None:
        logger = MLFlowLogger(tracking_uri=tracking_uri(), run_id=run_id, prefix="reference" if reference else "")
    trainer = L.Trainer(
        max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=lightning_strategy(cfg.strategy), precision=cfg.precision, gradient_clip_val=cfg.grad_clip,
        val_check_interval=cfg.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=cfg.val_batches, logger=logger, callbacks=callbacks, enable_checkpointing=False,
        log_every_n_steps=cfg.log_every, deterministic=cfg.accelerator == "cpu", use_distributed_sampler=False,
        enable_model_summary=False, default_root_dir=str(ckpt_dir), enable_progress_bar=True,
    )
    dm = QuillanDataModule(train_set, val_set, cfg, params.seed)
    last = ckpt_dir / "last.ckpt"
    # Batches are a function of the step (QuillanDataModule.batch), so resuming mid-epoch is exact.
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    if last.exists():
        print(f"train: resuming {name} from {last.relative_to(ROOT)}")
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    except NonFiniteError as e:
        kept = f"last good checkpoint kept: {last.relative_to(ROOT)}" if last.exists() else "no checkpoint yet"
        raise TrainingFailed(f"{name}: {e}; {kept}") from None
    hist = {"train": history.train_rows, "val": history.val_rows,
            "expert_load": [x.tolist() for x in module.expert_load]}
    if trainer.is_global_zero:
        with atomic_path(done_dir) as tmp:  # a kill while saving leaves no half-written "done"
            save_model_dir(tmp, module.model)
            (tmp / "history.json").write_text(json.dumps(hist))
    return module.model, hist


def accuracy_columns(hist: dict) -> list[str]:
    """The val-row accuracy keys, overall first (empty when the probe was off)."""
    keys = sorted({k for r in hist["val"] for k in r if k.startswith(VAL_ACCURACY)})
    return sorted(keys, key=lambda k: (k != VAL_ACCURACY, k))


def _plots(hist: dict, ref_hist: dict | None, tokens_at: list[int]) -> list[Path]:
    from tasks.plots import save_heatmap, save_lines

    PLOTS_DIR.mkdir(exist_ok=True)
    loss = {"ternary (train)": [(r["step"], r["train/loss"]) for r in hist["train"] if "train/loss" in r],
            "ternary (val)": [(r["step"], r["val/loss"]) for r in hist["val"]]}
    if ref_hist:
        loss["reference (train)"] = [(r["step"], r["train/loss"]) for r in ref_hist["train"] if "train/loss" in r]
        loss["reference (val)"] = [(r["step"], r["val/loss"]) for r in ref_hist["val"]]
    paths = [save_lines(PLOTS_DIR / "train_loss.png", loss, "loss against step", "step", "cross-entropy (nats)"),
             save_lines(PLOTS_DIR / "train_lambda.png", {"λ": [(r["step"], r["lambda"]) for r in hist["train"] if "lambda" in r]},
                        "λ warmup (0 = full precision, 1 = ternary)", "step", "λ")]
    if hist["expert_load"]:
        last = torch.tensor(hist["expert_load"][-1])  # (layers, M·E) token shares at the last log step
        paths.append(save_heatmap(PLOTS_DIR / "train_expert_load.png", last.numpy(), "expert load (token share), last logged step",
                                  "expert (member·E + e)", "council layer"))
    # Always written (a DVC output): with the probe off it says so instead of plotting.
    columns = accuracy_columns(hist)
    series = {("all" if k == VAL_ACCURACY else k.rsplit("/", 1)[-1]):
              [(tokens_at[int(r["step"])] / 1e6, r[k]) for r in hist["val"] if k in r] for k in columns}
    if ref_hist and accuracy_columns(ref_hist):
        series["reference (all)"] = [(tokens_at[int(r["step"])] / 1e6, r[VAL_ACCURACY]) for r in ref_hist["val"]]
    title = ("greedy val accuracy against training tokens" if columns
             else "greedy val accuracy: not measured (train.val_accuracy_size: 0)")
    paths.append(save_lines(PLOTS_DIR / "train_accuracy.png", series, title, "training tokens (millions)",
                            "exact-match accuracy"))
    return paths


def _write_curves(hist: dict, ref_hist: dict | None, tokens_at: list[int]) -> None:
    """DVC plot files: plots/train_curves.csv (per step) and plots/train_val.csv (per validation
    check: training tokens so far, val loss, and greedy val accuracy where the probe ran)."""
    ref = {r["step"]: r for r in (ref_hist or {}).get("train", [])}
    rows = ["step,loss,lambda,lr,reference_loss"]
    for r in hist["train"]:
        rl = ref.get(r["step"], {}).get("train/loss", "")
        rows.append(f"{int(r['step'])},{r.get('train/loss', '')},{r.get('lambda', '')},{r.get('lr', '')},{rl}")
    write_text(PLOTS_DIR / "train_curves.csv", "\n".join(rows) + "\n")
    refv = {r["step"]: r for r in (ref_hist or {}).get("val", [])}
    columns = accuracy_columns(hist)
    names = [k.replace("val/", "").replace("/", "_") for k in columns]
    vrows = [",".join(["step", "tokens", "val_loss", "reference_val_loss", *names]
                      + (["reference_accuracy"] if columns and ref_hist else []))]
    for r in hist["val"]:
        cells = [int(r["step"]), tokens_at[int(r["step"])], r["val/loss"], refv.get(r["step"], {}).get("val/loss", "")]
        cells += [r.get(k, "") for k in columns]
        if columns and ref_hist:
            cells.append(refv.get(r["step"], {}).get(VAL_ACCURACY, ""))
        vrows.append(",".join(str(c) for c in cells))
    write_text(PLOTS_DIR / "train_val.csv", "\n".join(vrows) + "\n")


def run(params: Params) -> dict:
    cfg = params.train
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    model_cfg = params.quillan_config(tokenizer)
    train_set = TokenizedRecords(read_jsonl(DATA / "train.jsonl"), tokenizer, model_cfg.max_seq_len,
                                 digit_order=model_cfg.digit_order)
    val_set = TokenizedRecords(read_jsonl(DATA / "val.jsonl"), tokenizer, model_cfg.max_seq_len,
                               digit_order=model_cfg.digit_order)
    _prepare_checkpoints(fingerprint(params))
    is_zero = _rank() == 0
    ctx = (stage_run("train", {"seed": params.seed, "train": cfg.model_dump(), "model": model_cfg.to_dict()})
           if is_zero else contextlib.nullcontext(None))
    with ctx as tracker:
        run_id = tracker.run_id if tracker else None
        t0 = time.perf_counter()
        probe = val_probe(params, tokenizer)
        model, hist = fit_one("ternary", params, model_cfg, train_set, val_set, run_id, reference=False, probe=probe)
        seconds = time.perf_counter() - t0
        ref_model = ref_hist = None
        if cfg.fp_reference:
            t1 = time.perf_counter()
            ref_model, ref_hist = fit_one("reference", params, model_cfg, train_set, val_set, run_id, reference=True,
                                          probe=probe)
            ref_seconds = time.perf_counter() - t1
        if not is_zero:
            return {}
        from quillan.bitnet import weight_sparsity, zero_exit_share

        ev = evaluate_loss(model, val_set)
        tokens_at = tokens_by_step(train_set, step_sampler(train_set, cfg, params.seed), cfg.max_steps)
        n_tokens = tokens_at[-1]
        metrics = {"steps": cfg.max_steps, "lambda_schedule": cfg.lambda_schedule,
                   "ternary": {"val_loss": ev["loss"], "val_perplexity": ev["perplexity"],
                               "weight_sparsity": weight_sparsity(model),
                               "zero_exit_share": zero_exit_share(initial_model(params, model_cfg), model),
                               "train_seconds": round(seconds, 1),
                               "tokens_per_s": round(n_tokens / seconds, 1)}}
        with atomic_path(OUT_DIR) as tmp:
            save_model_dir(tmp, model, tokenizer)
            write_json(tmp / "train.json", {"seed": params.seed, "train": cfg.model_dump(), "steps": cfg.max_steps})
            if ref_model is not None:
                save_model_dir(tmp / "reference", ref_model, tokenizer)
        if ref_model is not None:
            rev = evaluate_loss(ref_model, val_set)
            metrics["reference"] = {"val_loss": rev["loss"], "val_perplexity": rev["perplexity"],
                                    "train_seconds": round(ref_seconds, 1)}
            metrics["ternary_vs_reference_val_loss"] = ev["loss"] / rev["loss"]
        if hist["val"] and VAL_ACCURACY in hist["val"][-1]:
            last = hist["val"][-1]
            metrics["ternary"]["val_accuracy"] = {"records": cfg.val_accuracy_size, "all": last[VAL_ACCURACY],
                                                  **{k.rsplit("/", 1)[-1]: v for k, v in last.items()
                                                     if k.startswith(VAL_ACCURACY + "/")}}
        path = write_metrics("train", metrics)
        _write_curves(hist, ref_hist, tokens_at)
        for p in _plots(hist, ref_hist, tokens_at):
            tracker.log_artifact(p, "plots")
        tracker.log_metrics({"final": metrics})
        tracker.log_artifact(path)
    kind = "ternary" if model_cfg.quantize else "full-precision (model.quantize: false)"
    summary = f"train: {kind} val loss {ev['loss']:.4f} (ppl {ev['perplexity']:.2f})"
    if "reference" in metrics:
        summary += f", reference {metrics['reference']['val_loss']:.4f}, ratio {metrics['ternary_vs_reference_val_loss']:.3f}"
    print(summary)
    return metrics
