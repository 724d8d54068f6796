"""Stage `grpo`: GRPO/DAPO fine-tuning of models/train on verifiable rewards, with the CCRL
council entropy bonus, and a rollback gate on held-out accuracy.

Outputs: models/grpo/ (model.safetensors, config.json, tokenizer.json, grpo.json),
metrics/grpo.json, plots/grpo_curves.csv, plots/grpo_reward.png, plots/grpo_accuracy.png.
Checkpoints go to models/grpo/checkpoints/ every `grpo.checkpoint_every` steps (atomically); a
re-run with the same inputs resumes from them and ends with the same weights. They are removed
when the stage succeeds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quillan.data.splits import stratified_sample
from quillan.checkpoint import CONFIG, WEIGHTS, load_model_dir, save_model_dir, write_checksums
from quillan.inference import accuracy_by_domain, paired_standard_error, pass_at_k, prior_pass_at_k
from quillan.rl import GRPOTrainer, NonFiniteError
from tasks.common import PLOTS_DIR, ROOT, atomic_path, read_jsonl, write_json, write_metrics, write_text
from tasks.params import Params
from tasks.tracking import file_md5, stage_run

IN_DIR = ROOT / "models" / "train"
OUT_DIR = ROOT / "models" / "grpo"
CKPT_DIR = OUT_DIR / "checkpoints"
DATA = ROOT / "data" / "generated"
CURVE_KEYS = ("reward_mean", "reward_std", "accuracy", "council_entropy", "completion_length", "kl",
              "clip_low", "clip_high", "zero_variance_share")


class GRPOFailed(RuntimeError):
    """GRPO stopped (non-finite loss or gradient); the message says where and what was kept."""


FAILURES = (GRPOFailed,)


def fingerprint(params: Params) -> str:
    """What a resumable checkpoint must agree with: config, starting weights and prompts."""
    blob = json.dumps({"seed": params.seed, "grpo": params.grpo.model_dump(),
                       "inputs": [file_md5(IN_DIR / "model.safetensors"), file_md5(DATA / "train.jsonl")]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_checkpoint(trainer: GRPOTrainer, step: int, history: list[dict], fp: str) -> None:
    """Model weights, AdamW state, history and per-task rollout counts after `step` steps,
    replacing the last checkpoint atomically."""
    with atomic_path(CKPT_DIR / "last") as tmp:
        save_model_dir(tmp, trainer.model)  # a model directory like every other, plus the run state
        save_file(trainer.optimizer_tensors(), str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"fingerprint": fp, "step": step, "history": history,
                                                         "task_stats": trainer.task_stats}))
        write_checksums(tmp, [WEIGHTS, CONFIG, "optimizer.safetensors", "state.json"])


def _resume(trainer: GRPOTrainer, fp: str) -> tuple[int, list[dict]]:
    """(first step to run, history so far): from the last checkpoint if it was made from the same
    inputs, else (0, []) with stale checkpoints discarded."""
    last = CKPT_DIR / "last"
    state = json.loads((last / "state.json").read_text()) if (last / "state.json").exists() else None
    if state is None or state.get("fingerprint") != fp:
        if CKPT_DIR.exists():
            print("grpo: discarding checkpoints made with other params or inputs")
            shutil.rmtree(CKPT_DIR)
        return 0, []
    saved, _ = load_model_dir(last)  # checksums (optimizer and state too), config, keys and shapes
    trainer.model.load_state_dict(saved.state_dict())
    trainer.load_optimizer_tensors(load_file(str(last / "optimizer.safetensors")))
    trainer.task_stats = state["task_stats"]
    print(f"grpo: resuming at step {state['step']} from {last.relative_to(ROOT)}")
    return state["step"], state["history"]


def _eval_records(path: Path, size: int, seed: int) -> list[dict]:
    """`size` stratified records of a split file (0: all of them)."""
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: empty split")
    return stratified_sample(records, size, seed) if size else records


def rollback_tolerance(before: list[int], after: list[int], floor: float, z: float) -> float:
    """The drop in val accuracy that counts as a regression: `floor`, or z paired standard errors
    of the difference (`quillan.inference.paired_standard_error`), whichever is larger."""
    return max(floor, z * paired_standard_error(before, after))


def _evaluate(model, tokenizer, records: list[dict], max_new_tokens: int, label: str) -> dict:
    with tqdm(total=len(records), desc=f"grpo: accuracy {label}", unit="rec", mininterval=5) as bar:
        return accuracy_by_domain(model, tokenizer, records, max_new_tokens, progress=bar.update)


def _pass_at_g(model, tokenizer, records: list[dict], cfg, seed: int, label: str) -> dict:
    """pass@1 and pass@G at the rollout temperature (quillan.inference.pass_at_k), per family."""
    with tqdm(total=len(records), desc=f"grpo: pass@{cfg.group_size} {label}", unit="rec", mininterval=5) as bar:
        return pass_at_k(model, tokenizer, records, cfg.group_size, cfg.temperature, cfg.eval_tokens, top_k=cfg.top_k,
                         seed=seed, progress=bar.update)


def _summary(acc: dict) -> dict:
    """An evaluation without its per-record outcomes (what metrics and MLflow keep)."""
    return {k: v for k, v in acc.items() if k != "outcomes"}


def _write_curves(history: list[dict]) -> None:
    rows = ["step," + ",".join(CURVE_KEYS)]
    rows += [f"{h['step']}," + ",".join(str(h.get(k, "")) for k in CURVE_KEYS) for h in history]
    write_text(PLOTS_DIR / "grpo_curves.csv", "\n".join(rows) + "\n")


def _plots(history: list[dict], before: dict, after: dict) -> list[Path]:
    from tasks.plots import save_bars, save_lines

    PLOTS_DIR.mkdir(exist_ok=True)
    curves = {"reward (mean)": [(h["step"], h["reward_mean"]) for h in history],
              "accuracy (rollouts)": [(h["step"], h["accuracy"]) for h in history]}
    domains = sorted(before["by_domain"])
    bars = {"before GRPO": [before["by_domain"][d] for d in domains] + [before["accuracy"]],
            "after GRPO": [after["by_domain"][d] for d in domains] + [after["accuracy"]]}
    return [save_lines(PLOTS_DIR / "grpo_reward.png", curves, "GRPO rollouts: reward and accuracy", "step", "mean"),
            save_bars(PLOTS_DIR / "grpo_accuracy.png", domains + ["all"], bars,
                      "greedy exact-match accuracy on the test split", "accuracy")]


def run(params: Params) -> dict:
    cfg = params.grpo
    model, tokenizer = load_model_dir(IN_DIR)
    if tokenizer is None:
        raise FileNotFoundError(f"{IN_DIR / 'tokenizer.json'}: file not found")
    train = read_jsonl(DATA / "train.jsonl")
    # The rollback decision reads the val split; the test split is only reported.
    val_set, eval_set = (_eval_records(DATA / f"{split}.jsonl", cfg.eval_size, params.seed) for split in ("val", "test"))
    history: list[dict] = []
    with stage_run("grpo", {"seed": params.seed, "grpo": cfg.model_dump()}) as tracker:
        val_before = _evaluate(model, tokenizer, val_set, cfg.eval_tokens, "before (val)")
        before = _evaluate(model, tokenizer, eval_set, cfg.eval_tokens, "before (test)")
        pass_set = _eval_records(DATA / "val.jsonl", cfg.pass_at_size, params.seed) if cfg.pass_at_size else []
        pass_before = _pass_at_g(model, tokenizer, pass_set, cfg, params.seed, "before") if pass_set else None
        t0 = time.perf_counter()
        if cfg.enabled and cfg.steps > 0:
            trainer = GRPOTrainer(model, tokenizer, train, cfg, params.seed)
            fp = fingerprint(params)
            start, history = _resume(trainer, fp)
            bar = tqdm(range(start, cfg.steps), desc="grpo", unit="step", initial=start, total=cfg.steps)
            for step in bar:
                try:
                    stats = trainer.step(step)
                except NonFiniteError as e:
                    kept = "last good checkpoint kept: models/grpo/checkpoints/last" if CKPT_DIR.exists() else "no checkpoint yet"
                    raise GRPOFailed(f"{e}; {kept}") from None
                history.append({"step": step, **stats})
                tracker.log_metrics({"grpo": stats}, step=step)
                bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", acc=f"{stats['accuracy']:.3f}")
                if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    _save_checkpoint(trainer, step + 1, history, fp)
        seconds = time.perf_counter() - t0
        val_after = _evaluate(model, tokenizer, val_set, cfg.eval_tokens, "after (val)") if history else val_before
        after = _evaluate(model, tokenizer, eval_set, cfg.eval_tokens, "after (test)") if history else before
        pass_after = (_pass_at_g(model, tokenizer, pass_set, cfg, params.seed, "after") if pass_set and history
                      else pass_before)
        drop = val_before["accuracy"] - val_after["accuracy"]
        tolerance = rollback_tolerance(val_before["outcomes"], val_after["outcomes"], cfg.rollback_tolerance,
                                       cfg.rollback_z)
        rolled_back = drop > tolerance
        if rolled_back:
            print(f"grpo: ROLLBACK — val accuracy fell from {val_before['accuracy']:.4f} to {val_after['accuracy']:.4f} "
                  f"(more than {tolerance:.4f}: grpo.rollback_tolerance {cfg.rollback_tolerance}, or "
                  f"{cfg.rollback_z} standard errors of the difference); models/grpo keeps the pre-GRPO weights")
            model, _ = load_model_dir(IN_DIR)
        with atomic_path(OUT_DIR) as tmp:
            save_model_dir(tmp, model, tokenizer)
            write_json(tmp / "grpo.json", {"seed": params.seed, "grpo": cfg.model_dump(), "steps": len(history),
                                           "rolled_back": rolled_back, "source": "models/train"})
        updated = [h for h in history if not h["skipped"]]
        metrics = {"enabled": cfg.enabled, "steps": len(history), "skipped_steps": len(history) - len(updated),
                   "before": _summary(before), "after": _summary(after),
                   "accuracy_gain": after["accuracy"] - before["accuracy"],
                   "accuracy_gain_se": paired_standard_error(before["outcomes"], after["outcomes"]),
                   "val_before": _summary(val_before), "val_after": _summary(val_after),
                   "rollback_tolerance": tolerance,
                   "rolled_back": rolled_back, "train_seconds": round(seconds, 1),
                   "seconds_per_step": round(seconds / max(1, len(history)), 2)}
        if pass_before is not None:
            metrics["pass_at_g_before"], metrics["pass_at_g_after"] = pass_before, pass_after
            # pass@G of guessing from each family's training answers: the part of pass@G that is chance
            metrics["pass_at_g_prior"] = prior_pass_at_k(train, pass_set, cfg.group_size)
        if history:
            last = history[-max(1, len(history) // 5):]  # the last fifth of the steps
            metrics["rollout_reward_first"] = history[0]["reward_mean"]
            metrics["rollout_reward_last_fifth"] = sum(h["reward_mean"] for h in last) / len(last)
        path = write_metrics("grpo", metrics)
        _write_curves(history)
        for p in _plots(history, metrics["before"], metrics["after"]):
            tracker.log_artifact(p, "plots")
        tracker.log_metrics({"final": {k: v for k, v in metrics.items()
                                       if k not in ("before", "after", "val_before", "val_after")},
                             **{k: metrics[k] for k in ("before", "after", "val_before", "val_after")}})
        tracker.log_artifact(path)
    per_domain = ", ".join(f"{d} {before['by_domain'][d]:.3f}→{after['by_domain'][d]:.3f}" for d in before["by_domain"])
    print(f"grpo: test accuracy {before['accuracy']:.4f} → {after['accuracy']:.4f} ({per_domain})"
          + (" — rolled back" if rolled_back else ""))
    return metrics
