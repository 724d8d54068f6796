import math

import pytest
import torch

from quillan.rl import (council_entropy, dynamic_sample, group_advantages, informative_probability,
                        multi_objective_reward, overlong_penalty, policy_loss)


def test_group_advantages_every_mode_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # second group all equal
    s = 0.5 / math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1) is sqrt(1/3)
    assert torch.allclose(group_advantages(r, 4, "grpo"), torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-5)
    assert torch.allclose(group_advantages(r, 4, "dr_grpo"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert torch.allclose(group_advantages(r, 4, "positive_clip"), torch.tensor([s, 0, 0, s, 0, 0, 0, 0]), atol=1e-5)
    r3 = torch.tensor([3.0, 0.0, 0.0])  # centred (2, -1, -1), std sqrt(3)
    assert torch.allclose(group_advantages(r3, 3, "grpo"), torch.tensor([2, -1, -1]) / math.sqrt(3), atol=1e-5)
    assert torch.allclose(group_advantages(r3, 3, "positive_clip"), torch.tensor([1.0, 0.0, 0.0]))  # 1.155 clipped
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def _batch():
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.0, 0.7, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return ratios.log(), torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (-2.78 / 3 + 1.8 / 2) / 2),   # per-sequence means, then mean
    ("dapo", (-2.78 + 1.8) / 5),           # token level
    ("dr_grpo", (-2.78 + 1.8) / (2 * 4)),  # / (B · max_len), max_len = 4
])
def test_policy_loss_aggregations_by_hand(loss_type, expected):
    # A = +1: tokens give −1, −min(1.5, 1.28) = −1.28, −min(0.5, 0.8) = −0.5 (sum −2.78)
    # A = −1: max(1, 1) = 1, max(0.7, 0.8) = 0.8, third token masked (sum 1.8)
    logp, old, adv, mask = _batch()
    loss, stats = policy_loss(logp, old, adv, mask, loss_type=loss_type, max_len=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_low"] == pytest.approx(0.2)   # ratio 0.7 < 0.8 with A < 0
    assert stats["clip_high"] == pytest.approx(0.2)  # ratio 1.5 > 1.28 with A > 0 (2.0 is masked)
    assert stats["ratio_mean"] == pytest.approx(0.94)


def test_k3_kl_term_by_hand():
    logp, old, adv, mask = _batch()
    loss, stats = policy_loss(logp, old, adv, mask, loss_type="dapo", ref_logp=torch.zeros(2, 3), beta=0.1)
    kl = [1 / r + math.log(r) - 1 for r in (1.0, 1.5, 0.5, 1.0, 0.7)]  # exp(ref−logp) − (ref−logp) − 1
    assert loss.item() == pytest.approx((-0.98 + 0.1 * sum(kl)) / 5, abs=1e-6)
    assert stats["kl"] == pytest.approx(sum(kl) / 5, abs=1e-6)


def test_zero_advantage_gives_zero_loss_and_gradient():
    logp = torch.randn(4, 5, requires_grad=True)
    rewards = torch.ones(4)  # one group, all equal: nothing to learn, no division by zero
    adv = group_advantages(rewards, 4)
    loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones(4, 5), loss_type="dapo")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0


def test_informative_probability_by_hand():
    s, n = torch.tensor([0, 0, 30, 3]), torch.tensor([0, 30, 30, 6])
    got = informative_probability(s, n, group_size=8)
    p = torch.tensor([0.5, 1 / 32, 31 / 32, 0.5], dtype=torch.float64)  # (s + 1) / (n + 2)
    assert torch.allclose(got.double(), 1 - p**8 - (1 - p) ** 8, atol=1e-7)
    assert math.isclose(float(got[0]), 1 - 2 / 256, rel_tol=1e-6)
    assert float(got[1]) == pytest.approx(float(got[2]))  # never and always solved: equally useless
    assert float(got[1]) < 0.23 < float(got[3])


def test_overlong_penalty_three_regions():
    lengths = torch.tensor([10, 15, 17, 20, 21])
    assert torch.allclose(overlong_penalty(lengths, max_len=20, cache_len=5),
                          torch.tensor([0.0, 0.0, -0.4, -1.0, -1.0]))


def test_council_entropy_bonus_sign():
    mask = torch.ones(2, 3)
    uniform = [torch.full((2, 3, 4), 0.25)]
    peaked = [torch.tensor([0.97, 0.01, 0.01, 0.01]).expand(2, 3, 4)]
    assert council_entropy(uniform, mask).item() == pytest.approx(math.log(4))
    beta = 0.05
    loss = lambda probs: 1.0 - beta * council_entropy(probs, mask)  # noqa: E731  (base loss 1.0)
    assert loss(uniform) < loss(peaked)  # higher entropy lowers the loss


def test_multi_objective_reward():
    r = multi_objective_reward(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]),
                               w_correct=1.0, w_format=0.2, w_error=0.5)
    assert torch.allclose(r, torch.tensor([1.2, -0.3, 1.0]))


def test_dynamic_sampling_drops_equal_groups_and_stops():
    draws = iter([
        [{"rewards": torch.tensor([1.0, 1.0])}, {"rewards": torch.tensor([0.0, 1.0])}],
        [{"rewards": torch.tensor([0.0, 0.0])}, {"rewards": torch.tensor([1.0, 0.0])}],
        [{"rewards": torch.tensor([0.0, 1.0])}],
    ])
    kept, stats = dynamic_sample(lambda: next(draws), groups_wanted=2, max_draws=5)
    assert len(kept) == 2 and stats == {"dropped": 2, "draws": 2}
    never = dynamic_sample(lambda: [{"rewards": torch.ones(3)}], groups_wanted=1, max_draws=3)
    assert never[0] == [] and never[1] == {"dropped": 3, "draws": 3}


def test_grpo_raises_reward_on_a_toy_verifiable_task():
    """A categorical policy over 5 answers; the verifier accepts answer 3. GRPO with clip-higher
    and the DAPO loss must raise the mean reward, deterministically."""
    torch.manual_seed(0)
    logits = torch.zeros(5, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    g = torch.Generator().manual_seed(0)
    means = []
    for _ in range(30):
        with torch.no_grad():
            old = torch.log_softmax(logits, -1)
            actions = torch.multinomial(old.exp(), 8 * 4, replacement=True, generator=g)  # 8 prompts × G=4
        rewards = (actions == 3).float()
        means.append(rewards.mean().item())
        adv = group_advantages(rewards, 4, "grpo")
        for _ in range(2):  # μ = 2 policy updates per batch
            logp = torch.log_softmax(logits, -1)[actions][:, None]
            loss, _ = policy_loss(logp, old[actions][:, None], adv, torch.ones(32, 1), loss_type="dapo")
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert means[0] < 0.35 and sum(means[-5:]) / 5 > 0.8, means  # chance is 0.2


def test_scale_rewards_group_batch_none_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0])
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 2.25, -0.75, -0.75, -0.75])
    group_std = torch.tensor([math.sqrt(1 / 3)] * 4 + [1.5] * 4)  # sample stds of (1,0,0,1) and (3,0,0,0)
    batch_std = r.std()  # one std over all eight rewards
    assert torch.allclose(group_advantages(r, 4, scale="group"), centred / (group_std + 1e-6), atol=1e-5)
    assert torch.allclose(group_advantages(r, 4, scale="batch"), centred / (batch_std + 1e-6), atol=1e-5)
    assert torch.allclose(group_advantages(r, 4, scale="none"), centred)
    assert torch.equal(group_advantages(r, 4, "dr_grpo", scale="batch"), group_advantages(r, 4, scale="none"))
    # Batch scaling keeps the groups' relative sizes: the second group's spread counts for more.
    b = group_advantages(r, 4, scale="batch")
    assert b[4] / b[0] == pytest.approx(2.25 / 0.5)
    with pytest.raises(ValueError, match="unknown reward scaling 'prompt'"):
        group_advantages(r, 4, scale="prompt")


def test_sequence_level_importance_ratio_by_hand():
    """GSPO: one ratio per sequence, the exp of the mean token log-ratio, clipped as a whole."""
    logp, old, adv, mask = _batch()
    s1 = math.exp((math.log(1.0) + math.log(1.5) + math.log(0.5)) / 3)   # 0.9086
    s2 = math.exp((math.log(1.0) + math.log(0.7)) / 2)                   # 0.8367 (third token masked)
    # A = +1: −min(s1, clip(s1)) = −s1 per token; A = −1: −min(−s2, −clip(s2)) = max(s2, 0.8) = s2.
    loss, stats = policy_loss(logp, old, adv, mask, loss_type="dapo", level="sequence")
    assert loss.item() == pytest.approx((-3 * s1 + 2 * s2) / 5, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx((3 * s1 + 2 * s2) / 5, abs=1e-6)
    # A tighter clip binds for the whole second sequence: s2 < 1 − 0.1 with A < 0.
    loss, stats = policy_loss(logp, old, adv, mask, loss_type="dapo", level="sequence", eps_low=0.1, eps_high=0.1)
    assert loss.item() == pytest.approx((-3 * s1 + 2 * 0.9) / 5, abs=1e-6)
    assert stats["clip_low"] == pytest.approx(2 / 5)
    # The gradient reaches every token of a sequence equally: d/d logp_t of s_i·A_i/|y_i|·... is s_i·A/(n·|y_i|).
    lp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv, mask, loss_type="dapo", level="sequence")
    loss.backward()
    assert torch.allclose(lp.grad[0], torch.full((3,), -s1 * 3 / (5 * 3)), atol=1e-6)
    assert torch.allclose(lp.grad[1, :2], torch.full((2,), s2 * 2 / (5 * 2)), atol=1e-6)
    assert lp.grad[1, 2] == 0.0
    with pytest.raises(ValueError, match="unknown importance sampling level"):
        policy_loss(logp, old, adv, mask, loss_type="dapo", level="group")


def test_config_rejects_dr_grpo_with_a_std_scaling():
    from quillan.rl.config import GRPOConfig

    assert GRPOConfig(advantage="dr_grpo").scale_rewards == "group"  # the default does not conflict
    GRPOConfig(advantage="dr_grpo", scale_rewards="none")
    with pytest.raises(ValueError, match="contradicts scale_rewards 'batch'"):
        GRPOConfig(advantage="dr_grpo", scale_rewards="batch")
