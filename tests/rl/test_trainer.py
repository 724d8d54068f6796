"""Rollouts, batch packing, log-probs and the GRPO step on a tiny model and tokenizer."""

import copy

import pytest
import torch

from quillan.config import QuillanConfig
from quillan.data.generators import generate_tasks
from quillan.data.tokenizer import special_ids, train_tokenizer, training_text
from quillan.model import Quillan
from quillan.rl import GRPOConfig, GRPOTrainer, Group, completion_logprobs, pack_groups, reward_parts, sample_groups
from quillan.rl.config import RewardWeights


@pytest.fixture(scope="module")
def setup():
    records = generate_tasks(24, 0, 0.3, ("math", "code", "reasoning", "writing"))
    tok = train_tokenizer((training_text(r) for r in records), vocab_size=320)
    torch.manual_seed(0)
    cfg = QuillanConfig.preset("smoke", vocab_size=tok.get_vocab_size())
    return Quillan(cfg), tok, records


def test_reward_parts():
    rec = {"answer": "42", "target": "2 tens ... Answer: 42"}
    assert reward_parts(rec, "carry 1. Answer: 42", finished=True) == (1.0, 1.0, 0.0)
    assert reward_parts(rec, "42", finished=True) == (1.0, 0.0, 0.0)        # right, but no "Answer:"
    assert reward_parts(rec, "Answer: 41", finished=False) == (0.0, 0.0, 0.0)  # truncated: no format
    assert reward_parts({"answer": "7", "target": "7"}, "  ", finished=True) == (0.0, 1.0, 1.0)  # empty answer


def _group(prompt, comps, rewards):
    r = torch.tensor(rewards)
    z = torch.zeros(len(comps))
    return Group({}, prompt, comps, [""] * len(comps), r, r, z, z, z)


def test_pack_groups_pads_prompts_left_and_completions_right():
    b = pack_groups([_group([1, 5], [[7, 2], [8]], [1.0, 0.0]), _group([1, 5, 6], [[9, 9, 2], []], [0.5, 0.0])], pad_id=0)
    assert b["input_ids"].tolist() == [[0, 1, 5, 7, 2, 0], [0, 1, 5, 8, 0, 0], [1, 5, 6, 9, 9, 2], [1, 5, 6, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert b["completion_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert b["rewards"].tolist() == [1.0, 0.0, 0.5, 0.0]


def test_sampled_groups_and_logprobs_agree_between_train_and_eval(setup):
    model, tok, records = setup
    g = torch.Generator().manual_seed(1)
    groups = sample_groups(model, tok, records[:3], 4, max_new_tokens=12, temperature=1.0, top_k=None,
                           weights=RewardWeights(), overlong_cache=4, generator=g)
    assert len(groups) == 3 and all(len(gr.completions) == 4 for gr in groups)
    eos = special_ids(tok)["eos"]
    for gr in groups:
        for c in gr.completions:
            assert len(c) <= 12 and (eos not in c[:-1])
        assert gr.rewards.shape == (4,)
    batch = pack_groups(groups, special_ids(tok)["pad"])
    model.eval()
    lp_eval, _ = completion_logprobs(model, batch)
    model.train()
    lp_train, alphas = completion_logprobs(model, batch)
    model.eval()
    mask = batch["completion_mask"].bool()
    # Rollouts sample in eval mode, updates score in train mode: at λ = 1 both are the same policy.
    assert torch.allclose(lp_eval[mask], lp_train[mask], atol=1e-5)
    assert (lp_eval[mask] <= 0).all() and len(alphas) == sum(b.council for b in model.blocks)
    assert alphas[0].shape[:2] == mask.shape


def _trainer(setup, **kw):
    model, tok, records = setup
    cfg = GRPOConfig(**{"steps": 2, "prompts_per_step": 3, "group_size": 4, "max_new_tokens": 10, "lr": 1e-3, **kw})
    return GRPOTrainer(copy.deepcopy(model), tok, records, cfg, seed=3)


def test_grpo_step_is_deterministic_and_resumable(setup):
    a, b = _trainer(setup, dynamic_sampling=False), _trainer(setup, dynamic_sampling=False)
    sa0, sb0 = a.step(0), b.step(0)
    assert sa0["reward_mean"] == sb0["reward_mean"] and sa0["groups_kept"] == 3
    # b continues in a fresh trainer from its saved weights and optimizer state, as a resumed run would.
    c = _trainer(setup, dynamic_sampling=False)
    c.model.load_state_dict(b.model.state_dict())
    c.load_optimizer_tensors(b.optimizer_tensors())
    c.task_stats = copy.deepcopy(b.task_stats)
    assert sum(n for _, n in a.task_stats.values()) == 3 * 4  # the completions of step 0, by task
    a.step(1), c.step(1)
    for (name, pa), pc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.equal(pa, pc), name


def test_all_equal_rewards_skip_the_update(setup):
    # No reward weight can differ between completions: every group has equal rewards.
    t = _trainer(setup, rewards=RewardWeights(correct=0.0, format=0.0, error=0.0), max_draws=2)
    before = copy.deepcopy(t.model.state_dict())
    stats = t.step(0)
    assert stats["skipped"] == 1.0 and stats["groups_kept"] == 0 and stats["groups_dropped"] == 6
    assert stats["zero_variance_share"] == 1.0 and stats["draws"] == 2
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in before.items())


def test_full_precision_update_leaves_every_ternary_weight_as_trained(setup):
    from quillan.bitnet import ternary_parameters

    t = _trainer(setup, dynamic_sampling=False, update="full_precision")
    frozen = {id(p) for p in ternary_parameters(t.model)}
    names = {id(p): n for n, p in t.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    assert t.step(0)["groups_kept"] == 3
    moved = {names[id(p)] for p in t.model.parameters() if not torch.equal(p, before[names[id(p)]])}
    assert len(frozen) > 0 and not moved & {names[i] for i in frozen}  # no latent ternary weight changed
    assert "embed.weight" in moved  # the full-precision parameters took the update
    assert all(p.requires_grad == (id(p) not in frozen) for p in t.model.parameters())


def test_sft_anchor_lowers_the_cross_entropy_of_training_records(setup):
    from quillan.train.data import masked_ce

    t = _trainer(setup, dynamic_sampling=False, sft_weight=20.0, sft_batch=8)
    batch = t.anchor_batch(0)
    assert batch["input_ids"].shape[0] == 8 and torch.equal(batch["labels"], t.anchor_batch(0)["labels"])

    def ce() -> float:
        t.model.eval()
        with torch.no_grad():
            return float(masked_ce(t.model(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"]))

    before = ce()
    stats = [t.step(s) for s in range(2)]  # both steps have an informative group (step 2 would not)
    assert all(s["skipped"] == 0.0 and s["sft_loss"] > 0 for s in stats)
    assert ce() < before - 0.05  # γ·CE dominates these updates: the anchor records got likelier


def test_update_moves_the_policy_towards_higher_advantage(setup):
    t = _trainer(setup, dynamic_sampling=False, rewards=RewardWeights(correct=0.0, format=0.0, error=0.0))
    # Reward = the first completion token's id: after a few updates on these groups, completions
    # with higher first tokens gain log-probability.
    model = t.model
    groups = sample_groups(model, t.tokenizer, t.draw_prompts(0, 0), 4, max_new_tokens=10, temperature=1.0,
                           top_k=None, weights=RewardWeights(), overlong_cache=0, generator=torch.Generator().manual_seed(0))
    for g in groups:
        g.rewards = torch.tensor([float(c[0]) for c in g.completions])
    batch = pack_groups(groups, t.pad_id)
    from quillan.rl import group_advantages, policy_loss

    adv = group_advantages(batch["rewards"], 4, "grpo")
    model.train()
    logp0, _ = completion_logprobs(model, batch)
    for _ in range(3):
        logp, _ = completion_logprobs(model, batch)
        loss, _ = policy_loss(logp, logp.detach(), adv, batch["completion_mask"], loss_type="dapo")
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
    logp1, _ = completion_logprobs(model, batch)
    m = batch["completion_mask"].float()
    seq_gain = ((logp1 - logp0).detach() * m).sum(1)
    assert bool((adv != 0).any()) and float((seq_gain * adv).sum()) > 0  # probability mass moved towards positive advantages


def test_domains_restrict_the_training_prompts(setup):
    t = _trainer(setup, domains=["code", "writing"])
    drawn = [r["domain"] for step in range(4) for r in t.draw_prompts(step, 0)]
    assert set(drawn) <= {"code", "writing"} and len(set(drawn)) == 2
    with pytest.raises(ValueError, match="fewer than grpo.prompts_per_step"):
        _trainer(setup, domains=["math"], prompts_per_step=1000)


def test_learnability_sampling_prefers_tasks_with_mixed_outcomes(setup):
    t = _trainer(setup, prompt_sampling="learnability", sampling_floor=0.05, prompts_per_step=2)
    mixed = t.tasks[0]
    for task in t.tasks:  # every task always failed so far, except one solved half the time
        t.task_stats[task] = [500, 1000] if task == mixed else [0, 1000]
    weights = t.task_weights()
    assert float(weights[0]) == pytest.approx(1 - 2 * (501 / 1002) ** 4, abs=1e-6)
    assert torch.all(weights[1:] == 0.05)
    drawn = [r for step in range(100) for r in t.draw_prompts(step, 0)]
    share = sum(f"{r['domain']}/{r['task']}" == mixed for r in drawn) / len(drawn)
    expected = float(weights[0] / weights.sum())  # per draw of one record; two distinct records shift it a little
    assert share > 0.5 * expected and share > 5 / len(t.tasks)
    uniform = _trainer(setup, prompt_sampling="uniform", prompts_per_step=2)
    u_share = sum(f"{r['domain']}/{r['task']}" == mixed for s in range(100) for r in uniform.draw_prompts(s, 0)) / 200
    assert u_share < share / 3


def test_trainer_step_raises_the_reward_of_a_toy_verifier():
    """GRPOTrainer.step itself, end to end: a smoke model first taught to answer "1" or "2" about
    equally (a few supervised steps), then GRPO steps rewarding "1" only. The rollout reward
    must rise well above its start; a sign error in advantages, ratio or loss would lower it."""
    from quillan.train.data import TokenizedRecords, collate, masked_ce

    words = ["apple", "river", "stone", "cloud", "garden", "planet", "silver", "winter"]
    records = [{"prompt": f"Pick one: {a} {b}", "answer": "1", "target": "1", "domain": "math", "task": "toy"}
               for a in words for b in words]
    tok = train_tokenizer((training_text(r) for r in records + [{"prompt": "", "target": "2"}]), vocab_size=270)
    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke", vocab_size=tok.get_vocab_size(), diffusion_steps=0))
    # Supervised warm start on a 50/50 mixture of the answers "1" and "2".
    mixed = [{**r, "target": "1" if i % 2 else "2"} for i, r in enumerate(records)]
    data = TokenizedRecords(mixed, tok, model.cfg.max_seq_len, digit_order=model.cfg.digit_order)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        rows = [data[(step * 16 + k) % len(data)] for k in range(16)]
        batch = collate(rows, data.pad_id)
        loss = masked_ce(model(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
        opt.zero_grad(), loss.backward(), opt.step()
    # No council entropy bonus: here (top-1 of 2 members) it drives the overseer to a tie (H → ln 2)
    # where the hard routing flips, and the reward fell from 0.48 to 0.05 before recovering.
    cfg = GRPOConfig(steps=12, prompts_per_step=8, group_size=8, max_new_tokens=3, lr=1e-3, lr_warmup_steps=0,
                     rewards=RewardWeights(correct=1.0, format=0.0, error=0.0), max_draws=2,
                     council_entropy_bonus=0.0)
    trainer = GRPOTrainer(model, tok, records, cfg, seed=0)
    rewards = [trainer.step(s)["reward_mean"] for s in range(cfg.steps)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert 0.2 < first < 0.8, rewards  # the warm start answers "1" about half the time
    assert last > first + 0.2 and last > 0.8, rewards
