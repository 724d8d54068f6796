import pytest
import torch

from quillan.config import QuillanConfig
from quillan.model import Quillan, sample_next


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Quillan(QuillanConfig.preset("smoke", **kw)).eval()
    with torch.no_grad():  # larger weights than the training init, so greedy decoding varies
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m


def test_kv_cache_generation_equals_full_recomputation():
    m = _model()
    x = torch.randint(4, 384, (3, 9), generator=torch.Generator().manual_seed(1))
    cached = m.generate(x, 12, temperature=0)
    full = m.generate(x, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    assert len(set(cached[:, 9:].flatten().tolist())) > 3  # a real sequence, not one repeated token


def test_left_padding_matches_unpadded_rows():
    m = _model(seed=3)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(4, 384, (1, 8), generator=g), torch.randint(4, 384, (1, 5), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = m.generate(batch, 6, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 8:], m.generate(a, 6, temperature=0)[0, 8:])
    assert torch.equal(out[1, 8:], m.generate(b, 6, temperature=0)[0, 5:])


def test_early_exit_above_one_equals_no_early_exit_and_low_threshold_saves_work():
    x = torch.randint(4, 384, (2, 6), generator=torch.Generator().manual_seed(4))
    base = _model(n_layers=3, early_exit_threshold=1.01)
    ref = base.generate(x, 8, temperature=0)
    assert base.block_evals_saved == 0
    same = _model(n_layers=3, early_exit_threshold=1.5)
    assert torch.equal(same.generate(x, 8, temperature=0), ref)
    eager = _model(n_layers=3, early_exit_threshold=1e-6)  # every generated token exits after block 0
    eager.generate(x, 8, temperature=0)
    # prefill never exits (2 rows × 6 tokens × 3 blocks); 7 decode steps × 2 rows skip 2 blocks each
    assert eager.block_evals_saved == 7 * 2 * 2
    assert eager.block_evals == 2 * 6 * 3 + 7 * 2 * 1


def test_eos_stops_rows():
    m = _model()
    x = torch.randint(4, 384, (2, 5), generator=torch.Generator().manual_seed(0))
    first = m.generate(x, 1, temperature=0)[:, -1]
    out = m.generate(x, 10, temperature=0, eos_id=int(first[0]))
    assert (out[0, 5:] == first[0]).all()


def test_forward_shapes_losses_and_backward():
    torch.manual_seed(0)
    m = Quillan(QuillanConfig.preset("smoke")).train()
    x = torch.randint(0, 384, (2, 12))
    out = m(x)
    assert out.logits.shape == (2, 12, 384)
    assert len(out.council_probs) == 2 and out.council_probs[0].shape == (2, 12, 2)
    assert torch.allclose(out.council_probs[0].sum(-1), torch.ones(2, 12))
    assert out.diffusion_loss > 0 and out.aux_loss > 0 and out.z_loss > 0
    (out.logits.logsumexp(-1).mean() + out.aux_loss + out.z_loss + out.diffusion_loss).backward()
    assert m.diffusion.mlp.w1.weight.grad.abs().sum() > 0
    assert m.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_diffusion_steps_zero_removes_denoiser():
    m = Quillan(QuillanConfig.preset("smoke", diffusion_steps=0))
    assert m.diffusion is None
    assert m(torch.randint(0, 384, (1, 4))).diffusion_loss == 0


def test_gradient_checkpointing_same_loss_and_grads():
    x = torch.randint(0, 384, (2, 8))
    losses = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = Quillan(QuillanConfig.preset("smoke", grad_checkpointing=ckpt, diffusion_steps=0)).train()
        loss = m(x).logits.float().pow(2).mean()
        loss.backward()
        losses.append((loss.item(), m.blocks[0].attn.q_proj.weight.grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0])
    assert torch.allclose(losses[0][1], losses[1][1], atol=1e-6)


def test_parameter_counts_and_gpu_preset_on_meta():
    smoke = Quillan(QuillanConfig.preset("smoke"))
    assert 80_000 < smoke.num_parameters() < 150_000
    cpu = Quillan(QuillanConfig.preset("cpu"))
    assert 1_000_000 < cpu.num_parameters() < 5_000_000
    assert cpu.num_parameters(active_only=True) < cpu.num_parameters()
    with torch.device("meta"):
        gpu = Quillan(QuillanConfig.preset("gpu"))
    assert all(p.is_meta for p in gpu.parameters())
    assert gpu.num_parameters() == 410_665_472
    assert gpu.num_parameters(active_only=True) == 49_594_880


@pytest.mark.parametrize("kw, msg", [
    (dict(expert_top_k=5), "model.expert_top_k (5) must be <= model.n_experts (4)"),
    (dict(n_heads=3), "must be divisible by model.n_heads"),
    (dict(n_kv_heads=3), "model.n_kv_heads (3) must divide model.n_heads (4)"),
    (dict(council_top_k=3), "model.council_top_k (3) must be <= model.n_council (2)"),
])
def test_config_rejects_contradictions(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        QuillanConfig.preset("smoke", **kw)


def test_sampling_filters():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    assert sample_next(logits, 0).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)}
    assert draws == {0}  # p(0) ≈ 0.71 alone reaches 0.5


def test_active_parameters_by_hand_on_smoke():
    cfg = QuillanConfig.preset("smoke")
    m = Quillan(cfg)
    per_expert = 3 * cfg.dim * cfg.expert_hidden
    # per council layer: 2·4 experts, 1 member × 2 experts active; 2·8 micro agents (u, v), 1 × 2 active
    inactive = cfg.n_layers * (per_expert * (8 - 2) + 2 * cfg.dim * (16 - 2))
    assert m.num_parameters(active_only=True) == m.num_parameters() - inactive


def _digit_model(seed=0):
    m = _model(seed, digit_positions=4, digit_ids=tuple(range(10, 20)))
    with torch.no_grad():
        m.digit_embed.weight[0].zero_()  # _model redraws every matrix; row 0 is "not a digit"
    return m


def test_digit_index_counts_within_each_run_causally_and_clips():
    m = _digit_model()
    ids = torch.tensor([[5, 10, 11, 12, 6, 13, 7, 10, 11, 12, 13, 14, 15]])
    assert m.digit_index(ids).tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 4, 4]]
    # continuing a run from the previous token's index, as cached decoding does
    assert m.digit_index(ids[:, 8:], torch.tensor([1])).tolist() == [[2, 3, 4, 4, 4]]
    assert m.digit_index(ids[:, 4:6], torch.tensor([3])).tolist() == [[0, 1]]


def test_digit_embedding_changes_only_digit_tokens_and_cached_decoding_matches():
    m = _digit_model()
    ids = torch.tensor([[5, 10, 11, 6, 7]])
    diff = (m.embed_tokens(ids) - m.embed(ids)).abs().sum(-1)[0]
    assert diff[[0, 3, 4]].tolist() == [0, 0, 0] and bool((diff[[1, 2]] > 0).all())
    x = torch.tensor([[5, 10, 11, 12, 6, 13], [7, 8, 9, 14, 15, 16]])
    cached = m.generate(x, 12, temperature=0)
    assert torch.equal(cached, m.generate(x, 12, temperature=0, use_cache=False))


def test_digit_positions_need_the_ten_digit_ids():
    with pytest.raises(ValueError, match="digit_ids"):
        QuillanConfig.preset("smoke", digit_positions=4)
    with pytest.raises(ValueError, match="digit_order"):
        QuillanConfig.preset("smoke", digit_order="reversed")
