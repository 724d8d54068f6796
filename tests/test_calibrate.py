import pytest
import math

import torch

from quillan.calibrate import collect_stats, precision_plan, sparsity_threshold
from quillan.data.splits import stratified_sample
from quillan.config import QuillanConfig
from quillan.data.generators import generate_tasks
from quillan.model import Quillan


def test_sparsity_threshold_table():
    assert sparsity_threshold(3_000_000) == 0.05
    assert sparsity_threshold(410_000_000) == 0.10
    assert sparsity_threshold(1_000_000_000) == 0.15
    assert sparsity_threshold(7_000_000_000) == 0.20


def test_stratified_sample_is_balanced_and_deterministic():
    rows = generate_tasks(60, seed=0)
    s = stratified_sample(rows, 24, seed=1)
    assert len(s) == 24 and s == stratified_sample(rows, 24, seed=1)
    cells = {}
    for r in s:
        cells[(r["domain"], r["difficulty"])] = cells.get((r["domain"], r["difficulty"]), 0) + 1
    assert len(cells) == 12 and set(cells.values()) == {2}


def test_plan_covers_every_module_with_parameters_and_stats_are_finite():
    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke"))
    plan = precision_plan(model)
    owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert set(plan) == owners
    assert plan["embed"] == plan["norm"] == plan["blocks.0.ffn.overseer"] == "fp16"
    assert plan["blocks.0.attn.q_proj"] == plan["blocks.1.ffn.experts.0.w1"] == "ternary"
    covered = sum(p.numel() for n, m in model.named_modules() if n in plan for p in m.parameters(recurse=False))
    assert covered == model.num_parameters() + model.head.weight.numel()  # tied head listed twice
    x = torch.randint(0, 384, (4, 10))
    stats = collect_stats(model, [{"input_ids": x, "attention_mask": torch.ones_like(x)}], [50.0, 99.0])
    assert set(stats) == set(plan)
    q = stats["blocks.0.attn.q_proj"]
    assert q["act_p50"] <= q["act_p99"] <= q["act_absmax"] and q["act_scale"] == q["act_absmax"] / 127
    assert 0.2 < q["zero_share"] < 0.45
    assert all(math.isfinite(v) for s in stats.values() for v in s.values() if isinstance(v, float))


def test_padding_positions_are_excluded_from_the_statistics():
    """Right-padded rows give the statistics of the same rows without their padding (attention is
    causal, so the real positions compute the same values); counting the padding would change them."""
    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke")).eval()
    real = torch.randint(4, 384, (4, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([real, torch.full((4, 4), 383)], dim=1)
    mask = torch.cat([torch.ones(4, 6, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)], dim=1)
    with_pad = collect_stats(model, [{"input_ids": padded, "attention_mask": mask}], [50.0, 99.0])
    without = collect_stats(model, [{"input_ids": real, "attention_mask": torch.ones_like(real)}], [50.0, 99.0])
    counted = collect_stats(model, [{"input_ids": padded, "attention_mask": torch.ones_like(padded)}], [50.0, 99.0])
    for name in ("blocks.0.attn.q_proj", "blocks.1.ffn.overseer"):
        for key in ("act_p50", "act_p99", "act_absmax"):
            assert with_pad[name][key] == pytest.approx(without[name][key], rel=1e-5), (name, key)
    assert any(counted[n]["act_p50"] != pytest.approx(without[n]["act_p50"], rel=1e-3) for n in without
               if "act_p50" in without[n])
