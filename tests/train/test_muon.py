"""Muon for the BitLinear weights, AdamW for the rest: the orthogonalization, the step against
PyTorch's own Muon and AdamW, the LR scheduler and checkpoints."""

import copy

import pytest
import torch

from quillan.train.muon import MuonAdamW, orthogonalized, rms_matched_scale


def test_orthogonalized_pushes_singular_values_to_one_keeping_singular_vectors():
    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    o = orthogonalized(g)
    s = torch.linalg.svdvals(o)
    # Five quintic steps leave every singular value inside ~[0.68, 1.14] (Jordan et al. 2024).
    assert s.min() > 0.6 and s.max() < 1.2
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cos = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.97).all()
    # Tall matrices are handled through their transpose: the same as orthogonalizing Gᵀ.
    assert torch.allclose(orthogonalized(g.mT), o.mT, atol=1e-12)


def test_rms_matched_scale():
    assert rms_matched_scale(torch.Size([64, 128])) == pytest.approx(0.2 * 128 ** 0.5)
    assert rms_matched_scale(torch.Size([8, 16, 4])) == pytest.approx(0.2 * 4.0)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(16, 32, generator=g))
    v = torch.nn.Parameter(torch.randn(16, 32, generator=g))   # same shape: one batched call
    b = torch.nn.Parameter(torch.randn(16, generator=g))
    x = torch.randn(64, 32, generator=g)  # full-rank gradients: bf16 and fp32 Newton–Schulz agree

    def loss():
        # b's gradient does not depend on w and v: the AdamW part can be compared bit for bit.
        return ((x @ w.T).tanh() * (x @ v.T)).pow(2).mean() + (b * x[:16, 0]).sin().sum()
    return (w, v, b), loss


def _run(opt, params, loss, steps: int):
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return [p.detach().clone() for p in params]


def test_step_matches_pytorch_muon_and_adamw():
    (w, v, b), loss = _problem()
    ours = MuonAdamW([w, v], [{"params": [b], "weight_decay": 0.0}], lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)
    got = _run(ours, (w, v, b), loss, 3)

    (w2, v2, b2), loss2 = _problem()
    muon = torch.optim.Muon([w2, v2], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([b2], lr=0.02, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(3):
        muon.zero_grad(), adamw.zero_grad()
        loss2().backward()
        muon.step(), adamw.step()
    # PyTorch runs Newton–Schulz in bfloat16, this module in float32: the displacements agree to
    # bf16's precision (a wrong sign, scale or momentum would be off by ≥ 50 %).
    start = _problem()[0]
    for ours_p, ref_p, p0 in zip(got[:2], (w2, v2), start):
        ours_d, ref_d = ours_p - p0.detach(), ref_p.detach() - p0.detach()
        assert ref_d.abs().max() > 0.02
        assert (ours_d - ref_d).norm() / ref_d.norm() < 0.05
    assert torch.equal(got[2], b2.detach())  # the AdamW part is PyTorch's AdamW


def test_lr_scheduler_reaches_both_parts_and_checkpoints_resume_exactly():
    (w, v, b), loss = _problem()
    opt = MuonAdamW([w, v], [{"params": [b], "weight_decay": 0.0}], lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # sets every group's lr at construction
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01] and opt.adamw.param_groups[0]["lr"] == 0.01
    _run(opt, (w, v, b), loss, 2)
    saved = copy.deepcopy(opt.state_dict())
    params_at_2 = [p.detach().clone() for p in (w, v, b)]
    uninterrupted = _run(opt, (w, v, b), loss, 2)

    with torch.no_grad():
        for p, p2 in zip((w, v, b), params_at_2):
            p.copy_(p2)
    resumed = MuonAdamW([w, v], [{"params": [b], "weight_decay": 0.0}], lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)
    resumed.load_state_dict(saved)
    assert len(resumed.state) == 3 and "momentum_buffer" in resumed.state[w] and "exp_avg" in resumed.state[b]
    assert resumed.adamw.state is resumed.state and resumed.param_groups[1]["lr"] == 0.01
    for a, c in zip(_run(resumed, (w, v, b), loss, 2), uninterrupted):
        assert torch.equal(a, c)


def test_rejects_non_matrix_weights():
    with pytest.raises(ValueError, match="2-D weights only"):
        MuonAdamW([torch.nn.Parameter(torch.zeros(3))], [], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
