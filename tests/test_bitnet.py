import copy

import pytest
import torch
from torch import nn

from quillan.bitnet import (BitLinear, activation_quantize, binary_quantize, binary_weight, set_lambda,
                            ternary_quantize, weight_sparsity)
from quillan.config import QuillanConfig
from quillan.model import Quillan


def test_ternary_quantize_hand_case_per_tensor():
    w = torch.tensor([[0.5, -1.0], [0.1, 2.0]])
    q, scale = ternary_quantize(w)
    assert torch.isclose(scale, torch.tensor(0.9))
    # w / 0.9 = [0.556, -1.111, 0.111, 2.222] → round → [1, -1, 0, 2] → clip → [1, -1, 0, 1]
    assert q.dtype == torch.int8
    assert q.tolist() == [[1, -1], [0, 1]]


def test_ternary_quantize_hand_case_per_channel():
    w = torch.tensor([[0.5, -1.0], [0.1, 2.0]])
    q, scale = ternary_quantize(w, per_channel=True)
    assert torch.allclose(scale.squeeze(1), torch.tensor([0.75, 1.05]))
    assert q.tolist() == [[1, -1], [0, 1]]  # 0.1 / 1.05 rounds to 0


def test_activation_quantize_hand_case():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, scale = activation_quantize(x)
    # row 0: absmax 2 → x * 63.5 = [63.5, -127, 31.75] → round-half-even → [64, -127, 32]
    assert q.dtype == torch.int8
    assert q[0].tolist() == [64, -127, 32]
    assert torch.isclose(scale[0, 0], torch.tensor(2.0 / 127))
    assert q[1].tolist() == [0, 0, 0]  # all-zero token: eps guards the division
    assert torch.allclose(q.float() * scale, x, atol=2.0 / 127 / 2 + 1e-6)


def test_lambda_zero_without_act_quant_equals_linear_exactly():
    torch.manual_seed(0)
    bl = BitLinear(16, 8, bias=True, act_quant=False)
    bl.lam = 0.0
    lin = nn.Linear(16, 8, bias=True)
    lin.load_state_dict(bl.state_dict())
    x = torch.randn(3, 5, 16)
    assert torch.equal(bl(x), lin(x))


def test_lambda_one_uses_exactly_three_weight_values():
    torch.manual_seed(0)
    bl = BitLinear(32, 16)
    bl.lam = 1.0
    w = bl.effective_weight()
    _, scale = ternary_quantize(bl.weight)
    values = set(torch.unique(w).tolist())
    assert len(values) == 3
    assert torch.allclose(torch.tensor(sorted(values)), torch.tensor([-1.0, 0.0, 1.0]) * scale)


def test_lambda_interpolates_and_eval_is_ternary():
    torch.manual_seed(0)
    bl = BitLinear(8, 4)
    bl.lam = 0.25
    expected = 0.75 * bl.weight + 0.25 * bl.ternary_weight()
    assert torch.allclose(bl.effective_weight(), expected)
    bl.eval()
    assert torch.equal(bl.effective_weight(), bl.ternary_weight())
    ref = BitLinear(8, 4, quantize=False).eval()
    assert torch.equal(ref.effective_weight(), ref.weight)  # the FP reference stays FP in eval


def test_ste_passes_gradients_to_full_precision_weights():
    torch.manual_seed(0)
    bl = BitLinear(6, 3, act_quant=True)
    bl.lam = 1.0
    x = torch.randn(4, 6, requires_grad=True)
    bl(x).sum().backward()
    q, s = activation_quantize(x.detach())
    # d/dW sum(x_q W_q^T) with the STE is grad_out^T @ x_q = column sums of the quantized input
    assert torch.allclose(bl.weight.grad, (q.float() * s).sum(0).expand(3, 6), atol=1e-6)
    assert torch.allclose(x.grad, bl.ternary_weight().sum(0).expand(4, 6), atol=1e-6)


def test_set_lambda_reaches_every_bitlinear_and_sparsity():
    model = Quillan(QuillanConfig.preset("smoke"))
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert set_lambda(model, 0.3) == len(layers) > 10
    assert all(m.lam == 0.3 for m in layers)
    zeros = sum(int((ternary_quantize(m.weight)[0] == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    assert weight_sparsity(model) == zeros / total
    assert 0.2 < weight_sparsity(model) < 0.5  # Gaussian init: P(|w| < mean|w|/2) ≈ 0.31
    try:
        set_lambda(model, 1.5)
    except ValueError as e:
        assert "[0, 1]" in str(e)
    else:
        raise AssertionError("λ = 1.5 accepted")


def test_tequila_gives_dead_zone_weights_a_gradient_where_the_ste_gives_none():
    """With zero input the plain STE gradient x_j·∂L/∂y_i vanishes for every weight; tequila's
    dead-zone bias gives exactly the weights quantized to 0 the gradient λ·Σ_tokens ∂L/∂y_i."""
    from quillan.bitnet import BitLinear, ternary_quantize

    torch.manual_seed(0)
    x = torch.zeros(5, 16)
    g = torch.randn(5, 8)  # ∂L/∂y
    grads = {}
    for method in ("absmean", "tequila"):
        layer = BitLinear(16, 8, act_quant=False, method=method, tequila_lambda=0.01).train()
        layer.weight.data = torch.linspace(-1, 1, 128).view(8, 16).clone()
        (layer(x) * g).sum().backward()
        grads[method] = layer.weight.grad
    q, _ = ternary_quantize(torch.linspace(-1, 1, 128).view(8, 16))
    dead = q == 0
    assert 0 < int(dead.sum()) < 128
    assert torch.count_nonzero(grads["absmean"]) == 0
    expected = (0.01 * g.sum(0))[:, None].expand(8, 16) * dead
    assert torch.allclose(grads["tequila"], expected, atol=1e-7)


def test_tequila_eval_adds_the_precomputed_bias_and_zero_exit_share():
    from quillan.bitnet import BitLinear, dead_zone_bias, ternary_quantize, zero_exit_share

    torch.manual_seed(1)
    layer = BitLinear(32, 4, method="tequila", tequila_lambda=0.5).eval()
    plain = BitLinear(32, 4).eval()
    plain.weight.data = layer.weight.data.clone()
    x = torch.randn(3, 32)
    q, _ = ternary_quantize(layer.weight)
    bias = 0.5 * (layer.weight * (q == 0)).sum(1)
    assert torch.allclose(dead_zone_bias(layer.weight, q, 0.5), bias)
    assert torch.allclose(layer(x), plain(x) + bias, atol=1e-6)
    before = torch.nn.Sequential(plain)
    after = copy.deepcopy(before)
    w = after[0].weight.data
    dead = ternary_quantize(w)[0] == 0
    first_dead = dead.flatten().nonzero()[0].item()
    w.view(-1)[first_dead] = 10.0  # one dead weight leaves the dead zone (the scale moves a little)
    share = zero_exit_share(before, after)
    assert share >= 1 / int(dead.sum()) and share < 0.5
    assert zero_exit_share(before, before) == 0.0


def test_binary_quantize_holds_exactly_two_values_per_row_at_the_l1_scale():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 0.0  # sign(0) must be +1, not a third value
    b = binary_quantize(w)
    for row, src in zip(b, w):
        scale = src.abs().mean()
        assert sorted(row.unique().tolist()) == pytest.approx([-scale.item(), scale.item()])
    assert b[0, 0] > 0
    assert torch.equal(b.sign(), torch.where(w >= 0, 1.0, -1.0))


def test_binary_weight_interpolates_in_training_and_passes_gradients_straight_through():
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = binary_weight(w, 0.25, training=True)
    assert torch.allclose(out, 0.75 * w + 0.25 * binary_quantize(w))
    out.sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))  # STE: identity for both terms
    assert torch.equal(binary_weight(w, 0.25, training=False), binary_quantize(w))
    assert binary_weight(w, 0.0, training=True) is w


def test_fused_activation_fake_quant_has_the_bits_of_activation_quantize_and_a_straight_through_gradient():
    from quillan.bitnet import activation_quantize, fake_quantize_activations

    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(64, 96, generator=g) * 10 ** (seed % 5 - 2)).requires_grad_(True)
        x.data[0] = 0.0  # an all-zero row: absmax clamps to eps
        q, scale = activation_quantize(x.detach())
        y = fake_quantize_activations(x)
        assert torch.equal(y, q.float() * scale), seed
        w = torch.randn(64, 96, generator=g)
        (y * w).sum().backward()
        assert torch.equal(x.grad, w)


def test_shared_input_equals_each_layer_on_its_own():
    from quillan.bitnet import on_shared_input

    torch.manual_seed(0)
    layers = (BitLinear(8, 4), BitLinear(8, 6))
    x = torch.randn(3, 8, requires_grad=True)
    shared = on_shared_input(layers, x)
    for layer, y in zip(layers, shared):
        assert torch.equal(y, layer(x))
    # A layer of another kind (an export's inference layer) is called as it is.
    plain = torch.nn.Linear(8, 2)
    mixed = on_shared_input((layers[0], plain), x)
    assert torch.equal(mixed[1], plain(x)) and torch.equal(mixed[0], layers[0](x))
    # A hooked layer sees its call (calibration collects activations through forward hooks).
    seen = []
    handle = layers[1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    on_shared_input(layers, x)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], x)


def test_stacked_effective_weight_equals_each_layers_own():
    from quillan.bitnet import stacked_effective_weight

    for per_channel in (False, True):
        torch.manual_seed(0)
        layers = [BitLinear(8, 6, per_channel=per_channel) for _ in range(3)]
        for lam in (0.0, 0.3, 1.0):
            for m in layers:
                m.lam = lam
            for training in (True, False):
                for m in layers:
                    m.train(training)
                stacked = stacked_effective_weight(layers)
                assert stacked.shape == (3, 6, 8)
                for g, m in enumerate(layers):
                    assert torch.equal(stacked[g], m.effective_weight()), (per_channel, lam, training)
        # In training at λ = 1 gradients reach each layer's own weight straight through.
        for m in layers:
            m.train()
        stacked_effective_weight(layers).sum().backward()
        assert all(torch.equal(m.weight.grad, torch.ones(6, 8)) for m in layers)
