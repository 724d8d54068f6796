"""The hybrid trust-region optimizer's parts: k-means, balanced batches, the clip, the controller."""

import math

import pytest
import torch

from quillan.train.hybrid import (ClusterBalancedSampler, HybridConfig, HybridTrustRegion, TrustRegionController,
                                  clip_to_radius, kmeans, state_features, ternary_update, token_histograms)


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(40, 2, generator=g) for c in centres])
    labels, cents = kmeans(x, 3, seed=1)
    truth = torch.arange(3).repeat_interleave(40)
    # One label per true cluster, and it is a bijection.
    mapping = {int(t): int(labels[truth == t].unique()[0]) for t in range(3)}
    assert all(len(labels[truth == t].unique()) == 1 for t in range(3)) and len(set(mapping.values())) == 3
    for t, c in mapping.items():
        assert torch.allclose(cents[c], x[truth == t].mean(0), atol=1e-5)
    assert torch.equal(kmeans(x, 3, seed=1)[0], labels)
    with pytest.raises(ValueError, match="k=5, N=4"):
        kmeans(x[:4], 5)


def test_token_histograms_compare_mixes_not_lengths():
    h = token_histograms([[1, 1, 2], [1, 1, 2, 1, 1, 2], [3]], vocab_size=4)
    assert torch.allclose(h.norm(dim=1), torch.ones(3))
    assert torch.allclose(h[0], h[1])  # same mix, twice the length
    assert torch.allclose(h[0], torch.tensor([0.0, math.sqrt(2), 1.0, 0.0]) / math.sqrt(3))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_histograms([[5]], vocab_size=4)


def test_cluster_balanced_batches_share_slots_equally_and_are_a_function_of_the_step():
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 3)  # very unequal cluster sizes
    s = ClusterBalancedSampler(labels, batch_size=9, total_steps=20, seed=4)
    for step in range(20):
        batch = s.batch_indices(step)
        assert len(batch) == 9
        assert torch.bincount(labels[batch], minlength=3).tolist() == [3, 3, 3]
    # A fresh sampler (a resumed run) draws the same batch for the same step.
    assert ClusterBalancedSampler(labels, 9, 20, seed=4).batch_indices(13) == s.batch_indices(13)
    # The small cluster is read through permutations: every member before any repeats.
    small = [i for step in range(1) for i in s.batch_indices(step) if labels[i] == 2]
    assert sorted(small) == [57, 58, 59]
    # Batch size not a multiple of K: counts differ by at most one.
    s2 = ClusterBalancedSampler(labels, batch_size=8, total_steps=5, seed=0)
    for step in range(5):
        counts = torch.bincount(labels[s2.batch_indices(step)], minlength=3)
        assert int(counts.max() - counts.min()) <= 1


def test_clip_to_radius_bounds_the_global_norm():
    deltas = [torch.full((3,), 2.0), torch.full((4,), -1.0)]  # norm sqrt(12 + 4) = 4
    clipped, norm, active = clip_to_radius(deltas, 1.0)
    assert norm == pytest.approx(4.0) and active
    assert math.sqrt(sum(float(d.pow(2).sum()) for d in clipped)) == pytest.approx(1.0)
    assert torch.allclose(clipped[0], torch.full((3,), 0.5))  # direction kept
    same, _, active = clip_to_radius(deltas, 5.0)
    assert not active and same is deltas


def test_ternary_update_has_three_values_at_the_absmean_scale():
    d = torch.tensor([0.3, -0.01, -0.2, 0.05])
    scale = d.abs().mean()
    assert torch.allclose(ternary_update(d), torch.tensor([1.0, 0.0, -1.0, 0.0]) * scale)


def _steps(opt, p, target, n=1):
    """n optimizer steps on the quadratic ‖p − target‖²."""
    for _ in range(n):
        def closure():
            opt.zero_grad()
            loss = ((p - target) ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)


def _problem(seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(20))
    target = torch.randn(20)
    return w, target


@pytest.mark.parametrize("ternary", [False, True])
def test_hybrid_step_never_moves_parameters_further_than_the_radius(ternary):
    w, target = _problem()
    cfg = HybridConfig(radius=0.001, ternary_update=ternary)
    opt = HybridTrustRegion([w], cfg, total_steps=50, seed=0, lr=0.5)
    for _ in range(30):
        before = w.detach().clone()
        _steps(opt, w, target)
        moved = float((w.detach() - before).norm())
        # The bound holds up to float32 rounding of θ + Δ (a few ulps of θ).
        assert moved <= opt.last["radius"] + 2 * torch.finfo(torch.float32).eps * float(before.norm())
        assert opt.last["radius"] <= cfg.radius * cfg.radius_range * float(before.norm()) * (1 + 1e-6)
        assert opt.last["clipped"] == 1.0  # lr 0.5 would move far more
    if ternary:  # each applied update is a scaled ternary vector: 0 or ±one step size (to float32 rounding)
        step = (w.detach() - before).abs()
        moving = step > 1e-9
        assert moving.any() and torch.allclose(step[moving], step[moving][0].expand(int(moving.sum())), rtol=1e-3)


def test_hybrid_with_a_wide_radius_is_adamw_scaled_by_the_multiplier():
    w, target = _problem()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt = HybridTrustRegion([w], HybridConfig(radius=1e6), total_steps=10, seed=0, lr=0.01)
    ref = torch.optim.AdamW([w2], lr=0.01)
    for p, o in ((w, opt), (w2, ref)):
        def closure(p=p, o=o):
            o.zero_grad()
            loss = ((p - target) ** 2).sum()
            loss.backward()
            return loss
        if o is opt:
            o.step(closure)
        else:
            closure()
            o.param_groups[0]["lr"] = 0.01 * opt.last["lr_multiplier"]
            o.step()
    assert opt.last["clipped"] == 0.0
    assert torch.allclose(w, w2, atol=1e-7)
    assert opt.param_groups[0]["lr"] == 0.01  # the schedule's value is restored


def test_controller_learns_from_the_reward_it_is_given():
    cfg = HybridConfig(exploration=0.3, controller_lr=0.02)
    ctl = TrustRegionController(cfg, seed=0)
    feats = state_features(2.0, 1.0, 0, 8, 2.1, 1e-6, 0.5)
    assert feats.shape == (6,) and feats[3] == pytest.approx(math.log(2.0 / 2.1))
    assert ctl.decode(ctl.net(feats).detach()) == pytest.approx((1.0, cfg.radius))  # zero-initialised head
    for _ in range(300):  # reward larger LR multipliers
        a = ctl.act(feats)
        ctl.learn(feats, a, reward=float(a[0]))
    mult, _ = ctl.decode(ctl.net(feats).detach())
    assert mult > 1.5


def test_hybrid_state_round_trips_for_an_exact_resume(tmp_path):
    w, target = _problem()
    cfg = HybridConfig(radius=0.01)
    full = HybridTrustRegion([w], cfg, total_steps=20, seed=3, lr=0.1)
    _steps(full, w, target, 10)
    w_half, _ = _problem()
    first = HybridTrustRegion([w_half], cfg, total_steps=20, seed=3, lr=0.1)
    _steps(first, w_half, target, 5)
    torch.save(first.state_dict(), tmp_path / "opt.pt")  # Lightning resumes with weights_only=True
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    resumed = HybridTrustRegion([w_half], cfg, total_steps=20, seed=3, lr=0.1)
    resumed.load_state_dict(state)
    _steps(resumed, w_half, target, 5)
    assert torch.equal(w, w_half)
