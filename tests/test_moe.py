import torch
import torch.nn.functional as F

from quillan.moe import CouncilFFN, load_balancing_loss, router_z_loss


def _micro(ffn, x: torch.Tensor, member: int) -> torch.Tensor:
    """Micro-agent output of one member for its tokens x (n, D), member by member (the reference)."""
    q = ffn.micro_query(x).view(-1, ffn.M, ffn.key_dim)[:, member]   # (n, dk)
    s, idx = (q @ ffn.micro_keys[member].T).topk(ffn.kp, dim=-1)      # (n, kp)
    g = s.float().softmax(dim=-1).to(x.dtype)
    u = ffn._agents(F.embedding(idx, ffn.micro_down[member]))         # (n, kp, D)
    v = ffn._agents(F.embedding(idx, ffn.micro_up[member]))
    h = F.gelu(torch.einsum("nd,nkd->nk", x, u)) * g
    return torch.einsum("nk,nkd->nd", h, v)


@torch.no_grad()
def forward_naive(ffn, x: torch.Tensor) -> torch.Tensor:
    """The council layer's function computed token by token: the reference for its grouped dispatch."""
    xs = x.reshape(-1, x.shape[-1])
    r = ffn.route(xs)
    rows = []
    for n in range(xs.shape[0]):
        y = torch.zeros_like(xs[n])
        for c in range(ffn.kc):
            m = int(r.members[n, c])
            member = torch.zeros_like(xs[n])
            for j in range(ffn.ke):
                member += r.expert_weights[n, c, j] * ffn.experts[m * ffn.E + int(r.experts[n, c, j])](xs[n : n + 1])[0]
            if ffn.P > 0:
                member += _micro(ffn, xs[n : n + 1], m)[0]
            y += r.member_weights[n, c] * member
        rows.append(y)
    return torch.stack(rows).view(x.shape)

def _council(**kw):
    torch.manual_seed(0)
    args = dict(dim=16, n_council=4, council_top_k=2, n_experts=4, expert_top_k=2, expert_hidden=8,
                n_micro=6, micro_top_k=2, micro_key_dim=4)
    args.update(kw)
    ffn = CouncilFFN(**args).eval()
    torch.nn.init.normal_(ffn.micro_up, std=0.1) if ffn.P else None
    return ffn


def test_load_balancing_is_one_under_uniform_routing():
    n, e, k = 64, 8, 2
    probs = torch.full((n, e), 1.0 / e)
    idx = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=1)  # every expert equally often
    assert torch.isclose(load_balancing_loss(probs, idx, e), torch.tensor(1.0))


def test_load_balancing_penalises_collapse():
    n, e = 32, 4
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(n, e)
    idx = torch.zeros(n, 1, dtype=torch.long)
    # f = [1, 0, 0, 0], P = [0.97, ...] → 4 · 0.97
    assert torch.isclose(load_balancing_loss(probs, idx, e), torch.tensor(3.88))


def test_router_z_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (torch.log(torch.tensor(2.0)) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert torch.isclose(router_z_loss(logits), expected)


def test_grouped_dispatch_equals_naive_per_token_loop():
    ffn = _council()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        fast, stats = ffn(x)
    slow = forward_naive(ffn, x)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert stats.council_probs.shape == (15, 4)
    assert int(stats.expert_counts.sum()) == 15 * 2 * 2


def test_micro_agents_gathered_and_dense_paths_equal_the_per_member_reference():
    ffn = _council(n_micro=6, micro_top_k=2)  # banks: M·P = 24 rows
    for tokens in (2, 5, 7):  # N·kc·kp = 8, 20 rows < 24: PEER gather; 28 ≥ 24: dense
        x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(tokens))
        xs = x.view(-1, 16)
        r = ffn.route(xs)
        reference = torch.zeros_like(xs)
        for n in range(tokens):
            for c in range(ffn.kc):
                reference[n] += r.member_weights[n, c] * _micro(ffn, xs[n : n + 1], int(r.members[n, c]))[0]
        assert torch.allclose(ffn._micro_all(xs, r.member_weights, r.members), reference, atol=1e-6)
    x = torch.randn(1, 7, 16)  # 7·2·2 = 28 ≥ 24 rows: every agent runs densely
    xs = x.view(-1, 16)
    r = ffn.route(xs)
    dense = ffn._micro_all(xs, r.member_weights, r.members)
    gathered = torch.cat([ffn._micro_all(xs[n : n + 1], r.member_weights[n : n + 1], r.members[n : n + 1])
                          for n in range(7)])
    assert dense.abs().max() > 1e-3
    assert torch.allclose(dense, gathered, atol=1e-6)


def test_micro_agents_score_only_kept_members_when_decoding():
    """N·kc < M (decoding): only the kept members' keys are scored; the result is the per-member
    reference's, and the same as scoring every member (a batch large enough for the full path)."""
    ffn = _council(n_council=8, n_micro=6, micro_top_k=2)  # kc = 2: N = 1, 3 score kept members only
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r = ffn.route(x)
        full = ffn._micro_all(x, r.member_weights, r.members)  # 6 · 2 ≥ 8: every member scored
        for rows in (slice(0, 1), slice(3, 6)):
            part = ffn._micro_all(x[rows], r.member_weights[rows], r.members[rows])
            reference = torch.zeros_like(part)
            for i, n in enumerate(range(rows.start, rows.stop)):
                for c in range(ffn.kc):
                    reference[i] += r.member_weights[n, c] * _micro(ffn, x[n : n + 1], int(r.members[n, c]))[0]
            assert part.abs().max() > 1e-3
            assert torch.allclose(part, reference, atol=1e-6)
            assert torch.allclose(part, full[rows], atol=1e-6)


def test_dense_micro_agents_pass_gradients_only_to_chosen_agents():
    ffn = _council(n_micro=16, micro_top_k=1, n_council=1, council_top_k=1)
    xs = torch.randn(20, 16)  # 20 rows ≥ 16: the dense path
    r = ffn.route(xs)
    ffn._micro_all(xs, r.member_weights, r.members).sum().backward()
    chosen = (ffn.micro_query(xs).view(20, 1, -1) @ ffn.micro_keys.transpose(1, 2)).argmax(-1).unique()
    touched = ffn.micro_up.grad[0].abs().sum(-1).nonzero().flatten()
    assert torch.equal(touched, chosen.sort().values)


def test_only_selected_experts_run():
    ffn = _council(n_council=8, council_top_k=1, n_experts=8, expert_top_k=2)
    calls = {}
    for i, expert in enumerate(ffn.experts):
        expert.register_forward_hook(lambda mod, inp, out, i=i: calls.__setitem__(i, calls.get(i, 0) + inp[0].shape[0]))
    x = torch.randn(1, 3, 16)  # 3 tokens × 1 member × 2 experts = at most 6 of 64 experts
    with torch.no_grad():
        _, stats = ffn(x)
        r = ffn.route(x.view(-1, 16))
        a_idx, b_idx = r.members, r.experts
    selected = {int(m) * 8 + int(e) for m, es in zip(a_idx.flatten(), b_idx.view(3, 2)) for e in es}
    assert set(calls) == selected
    assert len(calls) <= 6 and ffn.expert_calls == len(selected)
    assert sum(calls.values()) == 6  # each expert runs once, on exactly its tokens


def test_gradients_reach_routers_and_experts():
    ffn = _council()
    ffn.train()
    out, stats = ffn(torch.randn(2, 4, 16))
    (out.pow(2).mean() + stats.aux_loss + stats.z_loss).backward()
    assert ffn.overseer.weight.grad.abs().sum() > 0
    assert ffn.routers.weight.grad.abs().sum() > 0
    assert ffn.micro_up.grad.abs().sum() > 0


def test_auxiliary_losses_are_skipped_without_autograd_only():
    ffn = _council()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        _, inference = ffn(x)
    _, training = ffn(x)
    assert float(inference.aux_loss) == 0.0 and float(inference.z_loss) == 0.0
    assert float(training.aux_loss) > 0.5 and float(training.z_loss) > 0.0


def test_binary_agents_compute_with_binarized_banks_and_follow_lambda():
    from quillan.bitnet import binary_quantize, set_lambda

    ffn = _council(binary_agents=True)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    plain = _council()  # same seed: same weights, float agents
    with torch.no_grad():
        plain.micro_down.copy_(binary_quantize(ffn.micro_down))
        plain.micro_up.copy_(binary_quantize(ffn.micro_up))
        assert torch.allclose(ffn(x)[0], plain(x)[0], atol=1e-6)
        assert torch.allclose(ffn(x)[0], forward_naive(ffn, x), atol=1e-5)
    # Training at λ = 0 uses the float banks (and float experts): the float model's output.
    set_lambda(ffn, 0.0)
    assert ffn.lam == 0.0
    float_model = _council()
    set_lambda(float_model, 0.0)
    ffn.train(), float_model.train()
    assert torch.allclose(ffn(x)[0], float_model(x)[0], atol=1e-6)


def _loop_and_grouped(ffn, x):
    """The layer's output and the gradients of its expert weights, per-expert loop then grouped."""
    results = []
    for grouped in (False, True):
        ffn.grouped = grouped
        ffn.zero_grad(set_to_none=True)
        calls = ffn.expert_calls
        out, _ = ffn(x)
        out.pow(2).sum().backward()
        grads = [p.grad.clone() for e in ffn.experts for p in e.parameters() if p.grad is not None]
        results.append((out.detach(), grads, ffn.expert_calls - calls))
    ffn.grouped = True
    return results


def test_grouped_experts_equal_the_per_expert_loop_in_values_and_gradients(monkeypatch):
    """grouped_swiglu (three grouped matmuls over stacked effective weights) gives the loop's values
    and weight gradients to float rounding (SiLU's vectorised and scalar tails round differently,
    and where a row falls depends on how many rows share its expert), the same expert calls, at
    every λ, in training and eval, per-tensor and per-channel scales, and without quantization."""
    import quillan.moe
    from quillan.bitnet import set_lambda

    grouped_calls = []
    real = quillan.moe.grouped_swiglu
    monkeypatch.setattr(quillan.moe, "grouped_swiglu", lambda *a: grouped_calls.append(1) or real(*a))
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    for kw in ({}, {"per_channel": True}, {"quantize": False}):
        ffn = _council(**kw)
        for lam in (0.0, 0.4, 1.0):
            set_lambda(ffn, lam)
            for training in (True, False):
                ffn.train(training)
                (loop, g_loop, n_loop), (grouped, g_grouped, n_grouped) = _loop_and_grouped(ffn, x)
                assert torch.allclose(loop, grouped, rtol=1e-6, atol=1e-7), (kw, lam, training)
                assert n_loop == n_grouped > 0 and len(grouped_calls) == 1
                grouped_calls.clear()
                assert len(g_loop) == len(g_grouped) > 0
                for a, b in zip(g_loop, g_grouped):
                    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (kw, lam, training)


def test_experts_the_grouped_path_cannot_compute_take_the_loop():
    """Forward hooks (calibration), tequila's bias and other dtypes keep the per-expert calls."""
    from quillan.moe import stackable

    ffn = _council()
    x = torch.randn(5, 16)
    experts = list(ffn.experts)
    assert stackable(experts, x)
    assert not stackable(experts, x.double())
    handle = experts[3].w2.register_forward_hook(lambda *a: None)
    assert not stackable(experts, x)
    handle.remove()
    experts[0].w1.method = "tequila"
    assert not stackable(experts, x)
    experts[0].w1.method = "absmean"
    experts[1].w3.lam = 0.5  # layers configured differently cannot share one stacked quantization
    assert not stackable(experts, x)
