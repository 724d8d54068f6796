import math

import pytest

from quillan.train.schedules import LAMBDA_SCHEDULES, lambda_at, lr_at


@pytest.mark.parametrize("kind", [k for k in LAMBDA_SCHEDULES if k != "none"])
def test_lambda_boundaries(kind):
    total, frac = 1000, 0.4
    assert lambda_at(0, total, frac, kind) == 0.0
    assert lambda_at(400, total, frac, kind) == pytest.approx(1.0, abs=1e-12)
    assert lambda_at(401, total, frac, kind) == 1.0
    assert lambda_at(999, total, frac, kind) == 1.0
    values = [lambda_at(s, total, frac, kind) for s in range(0, 401)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone ramp
    assert all(0.0 <= v <= 1.0 for v in values)


def test_lambda_shapes_at_midpoint():
    assert lambda_at(200, 1000, 0.4, "linear") == pytest.approx(0.5)
    assert lambda_at(200, 1000, 0.4, "cosine") == pytest.approx(0.5)
    assert lambda_at(200, 1000, 0.4, "sigmoid") == pytest.approx(0.5)
    assert lambda_at(200, 1000, 0.4, "exponential") == pytest.approx(math.expm1(2.5) / math.expm1(5))
    assert lambda_at(100, 1000, 0.4, "cosine") == pytest.approx((1 - math.cos(math.pi / 4)) / 2)


def test_none_is_abrupt_and_zero_warmup_is_ternary():
    assert lambda_at(0, 100, 0.4, "none") == 1.0
    assert lambda_at(0, 100, 0.0, "linear") == 1.0
    with pytest.raises(ValueError, match="unknown lambda schedule"):
        lambda_at(0, 100, 0.4, "step")


def test_lr_warmup_then_cosine():
    assert lr_at(0, 100, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
