import math

import pytest
import torch

from quillan.packing import bits_per_weight, pack_ternary, packed_size, unpack_ternary


@pytest.mark.parametrize("shape", [(1,), (4,), (5,), (6,), (7, 3), (3, 11, 13), (64, 129), (0,)])
def test_round_trip_exact_for_every_shape(shape):
    g = torch.Generator().manual_seed(math.prod(shape) + 1)
    q = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(q.numel())
    assert torch.equal(unpack_ternary(packed, shape), q)


def test_five_trits_per_byte_encoding():
    q = torch.tensor([1, 0, -1, 1, 1], dtype=torch.int8)
    # codes (q+1) = [2, 1, 0, 2, 2] → 2 + 1·3 + 0·9 + 2·27 + 2·81 = 221
    assert pack_ternary(q).tolist() == [221]
    assert pack_ternary(torch.ones(5, dtype=torch.int8)).tolist() == [242]  # largest code


@pytest.mark.parametrize("n", [5, 1000, 4096 * 4096])
def test_cost_is_at_most_1_6_bits_plus_constant(n):
    nbytes = packed_size(n)
    assert bits_per_weight(n, nbytes) <= 1.6 + 8 / n
    # log2(3) = 1.585 bits is the information limit of a trit: 5 per byte is within 1 % of it.
    assert math.log2(3) <= bits_per_weight(n, nbytes) <= 1.01 * math.log2(3) + 8 / n


def test_rejects_non_ternary_and_bad_lengths():
    with pytest.raises(ValueError, match=r"values in \{-1, 0, 1\}"):
        pack_ternary(torch.tensor([2], dtype=torch.int8))
    packed = pack_ternary(torch.zeros(10, dtype=torch.int8))
    with pytest.raises(ValueError, match="packed length 2 does not match shape \\(11,\\)"):
        unpack_ternary(packed, (11,))
    with pytest.raises(ValueError, match="not a valid 5-trit code"):
        unpack_ternary(torch.tensor([250], dtype=torch.uint8), (5,))
