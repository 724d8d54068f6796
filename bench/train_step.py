"""`python -m bench.train_step`: training throughput (real tokens/s) of each research switch on
the pipeline's own data and preset, measured in one quiet process. Writes bench/results/train_step.json.

The DVC experiments report tokens/s over whole training runs, which share the machine with
whatever else runs; this measures the switches one after another under the same conditions:
`--steps` optimizer steps of the `train` stage's Lightning module at λ = 1 (the ternary regime
of most of training), the first `--warmup` steps untimed. Tokens are the batches' real
(unpadded) tokens, so a sampler that pads more (cluster-balanced batches) shows up as slower.
Needs the generate stage's outputs (data/generated, data/tokenizer.json).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from bench.common import write_result
from tasks.common import ROOT, read_jsonl
from tasks.params import load_params

SWITCHES: dict[str, dict] = {
    "default": {},
    # The step as it was before issue 20 (old_step), at the old batch of 32: the baseline of the
    # throughput target.
    "before: old step, batch 32": {"train.batch_size": 32, "old_step": True},
    "old step, batch 64": {"old_step": True},
    "default at batch 32": {"train.batch_size": 32},
    "quant.method=tequila": {"quant.method": "tequila"},
    "model.per_channel=true": {"model.per_channel": True},
    "quant.plan=adaptive": {"quant.plan": "adaptive"},
    "train.optimizer=hybrid": {"train.optimizer": "hybrid"},
    "train.optimizer=muon": {"train.optimizer": "muon"},
}


@contextlib.contextmanager
def old_step(on: bool):
    """The training step as it was before this issue's changes, the same values by more passes:
    BitLinear's activation fake-quant composed (activation_quantize, int8 round trip, STE sub/add)
    instead of one fused autograd function, every BitLinear quantizing its own copy of a shared
    input (q/k/v, w1/w3), the micro agents' bank rows always gathered (never dense), each expert
    called on its own (not grouped) and AdamW's for-loop implementation (not fused)."""
    import quillan.model
    import quillan.moe
    from quillan.bitnet import BitLinear, _ste, activation_quantize
    from quillan.train.lightning import QuillanLightning

    fused, shared = BitLinear.quantized_input, quillan.moe.on_shared_input

    def composed(self, x):
        if not (self.quantize and self.act_quant):
            return x
        q, scale = activation_quantize(x.detach())
        return _ste(x, q.to(x.dtype) * scale)

    def separate(layers, x):
        return [m(x) for m in layers]

    if on:
        BitLinear.quantized_input = composed
        quillan.moe.on_shared_input = quillan.model.on_shared_input = separate
        quillan.moe.CouncilFFN.dense_agents = False
        quillan.moe.CouncilFFN.grouped = False
        QuillanLightning.fused_adamw = False
    try:
        yield
    finally:
        BitLinear.quantized_input = fused
        quillan.moe.on_shared_input = quillan.model.on_shared_input = shared
        quillan.moe.CouncilFFN.dense_agents = True
        quillan.moe.CouncilFFN.grouped = True
        QuillanLightning.fused_adamw = True


def tokens_per_second(overrides: dict, steps: int, warmup: int, rows: int) -> dict:
    """Train `steps` steps with the switch; real tokens/s and ms/step over the timed steps."""
    import lightning as L

    from quillan.train.data import TokenizedRecords
    from quillan.train.lightning import QuillanDataModule, QuillanLightning

    overrides = dict(overrides)
    old = overrides.pop("old_step", False)
    params = load_params(overrides=overrides)
    tok = Tokenizer.from_file(str(ROOT / "data" / "tokenizer.json"))
    model_cfg = params.quillan_config(tok)
    data = TokenizedRecords(read_jsonl(ROOT / "data" / "generated" / "train.jsonl")[:rows], tok, model_cfg.max_seq_len,
                            digit_order=model_cfg.digit_order)
    cfg = params.train.model_copy(update={"max_steps": steps, "lr_warmup_steps": 0, "val_every": steps + 1})
    module = QuillanLightning(model_cfg, cfg, params.seed)
    dm = QuillanDataModule(data, data, cfg, params.seed)
    times: list[float] = []
    tokens = [0]

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step - 1
            if step >= warmup:
                times.append(time.perf_counter() - self.t0)
                tokens[0] += sum(len(data.items[i][0]) for i in dm._sampler().batch_indices(step))

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                        gradient_clip_val=cfg.grad_clip, deterministic=True)
    with old_step(old):
        trainer.fit(module, datamodule=dm)
    return {"tokens_per_s": round(tokens[0] / sum(times), 1), "ms_per_step": round(1000 * sum(times) / len(times), 1),
            "timed_steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rows", type=int, default=4096, help="training rows to draw batches from")
    ap.add_argument("--only", nargs="+", choices=list(SWITCHES), help="measure these switches only")
    args = ap.parse_args()
    results = {}
    chosen = {name: SWITCHES[name] for name in (args.only or SWITCHES)}
    for name, overrides in tqdm(chosen.items(), desc="bench.train_step", unit="switch"):
        results[name] = tokens_per_second(overrides, args.steps, args.warmup, args.rows)
        print(f"{name:28s} {results[name]['tokens_per_s']:9.1f} tokens/s  {results[name]['ms_per_step']:7.1f} ms/step")
    path = write_result("train_step", {"preset": load_params().preset, "steps": args.steps, "warmup": args.warmup,
                                       "rows": args.rows, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
