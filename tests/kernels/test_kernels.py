"""quillan.kernels: the I2 packing layout, the native kernel's exact integer arithmetic, and the
fallback when the kernel cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

from quillan import kernels
from quillan.bitnet import EPS, activation_quantize, ternary_quantize
from quillan.machine import cpu_flags


def test_i2_layout_of_one_block():
    q = torch.zeros(1, 128, dtype=torch.int8)
    q[0, 0], q[0, 32], q[0, 64], q[0, 96] = 1, -1, 1, 0  # byte 0 holds weights 0, 32, 64, 96
    q[0, 33] = 1                                          # byte 1, bits 2-3
    packed = kernels.pack_i2(q)
    assert packed.shape == (1, 32)
    # codes q + 1 = 2, 0, 2, 1 at bit offsets 0, 2, 4, 6
    assert int(packed[0, 0]) == 2 | (0 << 2) | (2 << 4) | (1 << 6)
    assert int(packed[0, 1]) == 1 | (2 << 2) | (1 << 4) | (1 << 6)
    assert int(packed[0, 2]) == 0b01010101  # four zero weights


@pytest.mark.parametrize("shape", [(1, 1), (3, 127), (5, 128), (2, 129), (7, 300)])
def test_i2_round_trip_and_padding(shape):
    q = torch.randint(-1, 2, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(sum(shape)))
    packed = kernels.pack_i2(q)
    assert packed.shape == (shape[0], kernels.padded(shape[1]) // 4)
    assert torch.equal(kernels.unpack_i2(packed, shape[1]), q)


@pytest.mark.skipif(kernels.library() is None, reason="native kernels unavailable on this machine")
@pytest.mark.parametrize("m,k,n", [(1, 128, 64), (4, 256, 3), (5, 1000, 33), (33, 130, 70), (2, 4096, 8),
                                   (64, 2048, 96)])
def test_native_kernel_is_the_exact_integer_product(m, k, n):
    torch.manual_seed(m + k + n)
    w, x = torch.randn(n, k), torch.randn(m, k) * 5
    x[0, :7] = 0.0  # a row with exact zeros, and (below) an all-zero row: absmax clamps to eps
    if m > 1:
        x[1] = 0.0
    for per_channel in (False, True):
        q, scale = ternary_quantize(w, per_channel)
        xq, xs = activation_quantize(x)
        exact = (xq.long() @ q.long().t())  # int64: no rounding anywhere
        y = kernels.ternary_linear(x, kernels.pack_i2(q), k, scale.float(), EPS)
        expected = (exact.float() * xs) * (scale.view(1, -1) if per_channel else scale)
        assert torch.equal(y, expected)


@pytest.mark.skipif(kernels.library() is None, reason="native kernels unavailable on this machine")
def test_activation_quantization_has_the_same_bits_as_pytorch():
    """5 M values, scales over 4 orders of magnitude: products land on .5 ties now and then, where
    one ulp of the reciprocal decides the rounding (PyTorch computes 127 / s as reciprocal · 127).
    Rows of 1,024 and of 1,000 and 7 values: the vector loops' 16- and 8-wide bodies and their
    scalar tails."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(256, (1024, 1000, 7)[seed % 3], generator=g) * 10 ** (seed % 5 - 2)
        q, scale = kernels.quantize_activations(x, EPS)
        q_ref, scale_ref = activation_quantize(x)
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref), seed


def test_extreme_activations_do_not_overflow_int16():
    """All weights +1 and every activation at +127 (and -127): the largest int16 partial sums."""
    if kernels.library() is None:
        pytest.skip("native kernels unavailable")
    k = 4096
    q = torch.ones(2, k, dtype=torch.int8)
    q[1] = -1
    x = torch.stack([torch.full((k,), 3.0), torch.full((k,), -3.0)])
    y = kernels.ternary_linear(x, kernels.pack_i2(q), k, torch.tensor(1.0), EPS)
    s = 3.0 / 127.0  # activation scale: absmax / 127
    assert torch.equal(y, torch.tensor([[127 * k * s, -127 * k * s], [-127 * k * s, 127 * k * s]]))


def _fresh_process(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """`python -c code` with its own kernel build cache under tmp_path, kernels on, `env` added."""
    env = {**os.environ, "QUILLAN_KERNEL_CACHE": str(tmp_path / "cache"), **env}
    env.pop("QUILLAN_KERNELS", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


# Each instruction path of ternary.cpp, the -march that selects it, and the CPU flags it needs.
# `cascadelake` is the oldest -march with VNNI (a subset of Ice Lake's, Sapphire Rapids' and Zen 4's);
# the AMX path needs `native` on a CPU that has AMX.
VNNI = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
BUILDS = {"scalar": ("x86-64", set()), "avx2": ("haswell", {"avx2"}), "avx512_vnni": ("cascadelake", VNNI),
          "amx_int8": ("native", VNNI | {"amx_tile", "amx_int8"})}


@pytest.mark.parametrize("path", kernels.PATHS)
def test_every_instruction_path_is_the_exact_integer_product(path, tmp_path):
    """ternary.cpp built for one path (`-march` per BUILDS) in a fresh process: the exact integer
    product, plain and grouped, at shapes with odd and even block counts, row tiles cut short and
    an odd number of weight rows. Paths this CPU cannot run are skipped, naming the missing flags."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        pytest.skip("the paths are built with x86-64 -march values")
    arch, needs = BUILDS[path]
    missing = needs - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))} for the {path} path")
    code = ("import sys, torch\n"
            "from quillan import kernels\n"
            "from quillan.bitnet import EPS, activation_quantize, ternary_quantize\n"
            "lib = kernels.library()\n"
            "if kernels.amx_refused():\n"
            "    print('amx refused'); sys.exit(0)\n"
            f"assert lib is not None and kernels.path() == {path!r}, (kernels.path(), kernels.unavailable_reason())\n"
            "for m, k, n in [(1, 128, 64), (5, 1000, 33), (33, 130, 70), (9, 256, 3), (17, 384, 65), (2, 4096, 8),\n"
            "                (16, 128, 16), (48, 640, 100), (70, 2048, 33)]:\n"
            "    torch.manual_seed(m + k + n)\n"
            "    w, x = torch.randn(n, k), torch.randn(m, k) * 5\n"
            "    for per_channel in (False, True):\n"
            "        q, scale = ternary_quantize(w, per_channel)\n"
            "        xq, xs = activation_quantize(x)\n"
            "        exact = (xq.long() @ q.long().t()).float() * xs * (scale.view(1, -1) if per_channel else scale)\n"
            "        packed = kernels.pack_i2(q)\n"
            "        assert torch.equal(kernels.ternary_linear(x, packed, k, scale.float(), EPS), exact), (m, k, n)\n"
            "        rows = scale.reshape(-1).expand(n).reshape(1, n)\n"
            "        y = kernels.grouped_ternary_linear(x, packed[None], k, rows, torch.tensor([m]), EPS)\n"
            "        assert torch.equal(y, exact), (m, k, n)\n"
            "# groups above and below the AMX path's 16 rows in one call, each against its exact product\n"
            "counts, k, n = [3, 20, 0, 17, 33], 384, 40\n"
            "qs = [ternary_quantize(torch.randn(n, k), True) for _ in counts]\n"
            "x = torch.randn(sum(counts), k) * 3\n"
            "y = kernels.grouped_ternary_linear(x, torch.stack([kernels.pack_i2(q) for q, _ in qs]), k,\n"
            "                                   torch.stack([s.reshape(-1) for _, s in qs]).float(), torch.tensor(counts), EPS)\n"
            "xq, xs = activation_quantize(x)\n"
            "for g, (rows, yg) in enumerate(zip(xq.split(counts), y.split(counts))):\n"
            "    q, s = qs[g]\n"
            "    exact = (rows.long() @ q.long().t()).float() * xs.split(counts)[g] * s.view(1, -1)\n"
            "    assert torch.equal(yg, exact), g\n"
            "# int8 rows (the int8 head): exact where the build has a loop (VPDPBUSD or AVX2), declined (None) on scalar\n"
            "for m, k, n in [(1, 512, 261), (5, 100, 7), (4, 64, 4), (9, 700, 3)]:\n"
            "    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)\n"
            "    s, x = torch.rand(n, 1) + 0.01, torch.randn(m, k) * 4\n"
            "    y = kernels.int8_rows_linear(x, q, s, EPS)\n"
            "    assert kernels.has_int8_rows() == (kernels.path() in ('amx_int8', 'avx512_vnni', 'avx2'))\n"
            "    if not kernels.has_int8_rows():\n"
            "        assert y is None\n"
            "        continue\n"
            "    xq, xs = activation_quantize(x)\n"
            "    assert torch.equal(y, ((xq.long() @ q.long().t()).float() * xs) * s.view(1, -1)), (m, k, n)\n"
            "print('ok')\n")
    proc = _fresh_process(code, tmp_path, QUILLAN_KERNEL_ARCH=arch)
    if "native ternary kernels unavailable" in proc.stderr and "no C++ compiler" in proc.stderr:
        pytest.skip("no C++ compiler")
    if proc.returncode == 0 and proc.stdout.strip() == "amx refused":
        pytest.skip("Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_int8_rows_are_the_exact_integer_product():
    """The int8 head's native loop against the int64 product rescaled as Int8Head's `torch._int_mm`
    path does it: row counts below and at a 4-row tile, K with and without a 32- or 64-byte tail (and
    below one vector), N not a multiple of 4, and weights at ±127 against activations at ±127 (the
    largest int32 sums; on AVX2 also the largest int16 pair sums, 2 · 127 · 127)."""
    if not kernels.has_int8_rows():
        pytest.skip(f"the int8-rows loop needs AVX2 or VPDPBUSD; this build's path is {kernels.path()}")
    g = torch.Generator().manual_seed(0)
    extreme_q = torch.full((3, 4096), 127, dtype=torch.int8)
    extreme_q[1] = -127
    cases = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.randn(m, k, generator=g) * 3)
             for m, k, n in [(1, 512, 50), (2, 64, 4), (3, 65, 9), (4, 1000, 5), (7, 128, 1), (15, 512, 33),
                              (1, 31, 3), (5, 96, 6)]]
    cases.append((extreme_q, torch.stack([torch.full((4096,), 2.0), torch.full((4096,), -2.0)])))
    for q, x in cases:
        s = torch.rand(q.shape[0], 1, generator=g) + 1e-3
        xq, xs = activation_quantize(x)
        exact = ((xq.long() @ q.long().t()).float() * xs) * s.view(1, -1)
        assert torch.equal(kernels.int8_rows_linear(x, q, s, EPS), exact), tuple(q.shape)
    assert int((xq.long() @ extreme_q.long().t())[0, 0]) == 127 * 127 * 4096
    with pytest.raises(ValueError, match="K < 65536"):
        kernels.int8_rows_linear(torch.zeros(1, 65536), torch.zeros(2, 65536, dtype=torch.int8), torch.ones(2, 1), EPS)


def test_the_default_build_takes_the_widest_path_the_cpu_has():
    if kernels.library() is None:
        pytest.skip("native kernels unavailable")
    usable = [p for p in kernels.PATHS if BUILDS[p][1] <= cpu_flags()]
    if kernels.amx_refused():  # the CPU has AMX but Linux did not grant the tile state: VNNI is the widest usable
        usable.remove("amx_int8")
    assert kernels.path() == usable[0]


def test_unbuildable_kernel_falls_back_with_one_warning(tmp_path):
    code = ("import warnings, torch\n"
            "from quillan.export.layers import TernaryLinear\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    tl = TernaryLinear.from_float(torch.randn(16, 200))\n"
            "    TernaryLinear.from_float(torch.randn(16, 200))\n"
            "print(tl.path, len(w), str(w[0].message) if w else '')\n"
            "x = torch.randn(3, 200)\n"
            "assert torch.equal(tl(x), tl(x, path='float'))\n")
    proc = _fresh_process(code, tmp_path, CXX="/bin/false")
    assert proc.returncode == 0, proc.stderr
    path, count, message = proc.stdout.strip().split(" ", 2)
    assert (path, count) == ("float", "1")
    assert message.startswith("quillan: native ternary kernels unavailable (/bin/false failed on")
    assert message.endswith("using the PyTorch int8 path") and "\n" not in message


@pytest.mark.skipif(kernels.library() is None, reason="native kernels unavailable on this machine")
def test_grouped_kernel_equals_one_call_per_expert():
    """Groups of 0, 1, 3 and 70 rows (empty groups, a row tile of 4 split across groups), per-tensor
    and per-row scales: each group's rows have the bits of `ternary_linear` with its own weights."""
    torch.manual_seed(0)
    k, n, counts = 200, 70, [3, 0, 1, 70, 0]
    qs, scales = zip(*(ternary_quantize(torch.randn(n, k), per_channel=g % 2 == 1) for g in range(len(counts))))
    packed = torch.stack([kernels.pack_i2(q) for q in qs])
    row_scales = torch.stack([s.reshape(-1).expand(n) for s in scales])
    x = torch.randn(sum(counts), k) * 3
    y = kernels.grouped_ternary_linear(x, packed, k, row_scales, torch.tensor(counts), EPS)
    rows = x.split(counts)
    for g, c in enumerate(counts):
        if c:
            expected = kernels.ternary_linear(rows[g], packed[g], k, scales[g].float(), EPS)
            assert torch.equal(y.split(counts)[g], expected), f"group {g}"
    with pytest.raises(ValueError, match="counts sum to 74, x has 75 rows"):
        kernels.grouped_ternary_linear(torch.randn(75, k), packed, k, row_scales, torch.tensor(counts), EPS)
    with pytest.raises(ValueError, match="do not fit 5 experts"):
        kernels.grouped_ternary_linear(x, packed, k, row_scales[:2], torch.tensor(counts), EPS)
