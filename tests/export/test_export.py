"""Exports: every variant reloads from disk alone and matches the in-memory model, storage types
and bits per weight, the packed ternary layer against BitLinear, corrupted files, gates."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from quillan import kernels
from quillan.bitnet import BitLinear
from quillan.checkpoint import CheckpointError
from quillan.config import QuillanConfig
from quillan.export import VARIANTS, ExportConfig, convert, dequantized_weight, load, save
from quillan.export.layers import Int8Rows, TernaryLinear
from quillan.export.measure import champion_rule, gate_failures, pick_champion
from quillan.inference import paired_standard_error
from quillan.model import Quillan


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Quillan(QuillanConfig.preset("smoke", vocab_size=384)).eval()


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for v in VARIANTS:
        model, plan = convert(copy.deepcopy(base), v, ExportConfig())
        save(model, root / v, v, plan, {})
        out[v] = (model, root / v)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_reloads_and_generates_like_the_exported_model(exported, variant):
    model, path = exported[variant]
    reloaded, _ = load(path)
    ids = torch.randint(4, 384, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits) or variant == "fp16"
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5)
        out = reloaded.generate(ids, 5, temperature=0.0)
    assert out.shape == (2, 15)


def test_exports_compute_the_trained_ternary_network(base, exported):
    ids = torch.randint(4, 384, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = base(ids).logits
        for v in VARIANTS:  # FP16 storage of embeddings/norms and int8/int4 formats: small differences only
            assert (exported[v][0](ids).logits - ref).abs().max() < 0.05 * ref.abs().max(), v


def test_metadata_reports_sizes_and_bits_and_one_checksum_file(base, exported):
    for variant, (_, path) in exported.items():
        meta = json.loads((path / "metadata.json").read_text())
        assert meta["bytes_on_disk"] == (path / "model.safetensors").stat().st_size
        assert meta["parameters"] == base.num_parameters()
        assert meta["bits_per_weight_overall"] == pytest.approx(8 * meta["bytes_on_disk"] / meta["parameters"])
        sums = json.loads((path / "checksums.json").read_text())
        assert sorted(sums) == ["metadata.json", "model.safetensors"], variant
    # Packed ternary: 1.6 bits per weight, plus per layer a float32 scale and at most one byte
    # of rounding.
    tern = json.loads((exported["ternary"][1] / "metadata.json").read_text())
    weights = sum(math.prod(s) for s in tern["shapes"].values())
    assert 1.6 <= tern["bits_per_weight_quantized"] <= 1.6 + 8 * (1 + 4) * len(tern["shapes"]) / weights
    assert json.loads((exported["fp16"][1] / "metadata.json").read_text())["bits_per_weight_quantized"] == 16.0


def test_check_trainable_counts_weights_that_get_a_gradient(base):
    from quillan.data.generators import generate_tasks
    from quillan.data.tokenizer import train_tokenizer, training_text
    from quillan.export.stats import check_trainable

    records = generate_tasks(8, 0)
    tok = train_tokenizer((training_text(r) for r in records), 384)
    fp16, _ = convert(copy.deepcopy(base), "fp16", ExportConfig())
    got = check_trainable(fp16, tok, records)
    assert got["weights"] == sum(p.dim() == 2 for p in fp16.parameters())
    assert 0 < got["weights_with_gradient"] <= got["weights"]
    frozen = copy.deepcopy(fp16)
    for p in frozen.parameters():
        p.data.zero_()  # all-zero weights and embeddings: every weight's gradient is 0
    with pytest.raises(ValueError, match="no gradient reached any weight"):
        check_trainable(frozen, tok, records)


def test_storage_types_and_bits(exported):
    import bitsandbytes as bnb

    tern = load_file(str(exported["ternary"][1] / "model.safetensors"))
    packed = {k: t for k, t in tern.items() if k.endswith(".packed")}
    meta = json.loads((exported["ternary"][1] / "metadata.json").read_text())
    assert packed and all(t.dtype == torch.uint8 for t in packed.values())
    for key, t in packed.items():
        rows, cols = meta["shapes"][key[: -len(".packed")]]
        assert t.numel() == math.ceil(rows * cols / 5)  # 1.6 bits per weight (5 per byte)
    model8 = exported["int8"][0]
    lin8 = [m for m in model8.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert lin8 and all(m.weight.dtype == torch.int8 for m in lin8)
    assert not any(isinstance(m, BitLinear) for m in model8.modules())
    lin4 = [m for m in exported["int4"][0].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert lin4 and all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in lin4)
    mixed = exported["mixed"][0]
    kinds = {type(mixed.get_submodule(n)).__name__ for n in ("blocks.0.attn.q_proj", "blocks.0.ffn.experts.0.w1",
                                                             "blocks.0.ffn.micro_query", "blocks.0.ffn.micro_down")}
    assert kinds == {"TernaryLinear", "Int4Linear", "Linear8bitLt", "Int8Rows"}
    assert type(mixed.blocks[0].ffn.overseer) is torch.nn.Linear


@pytest.mark.parametrize("path", TernaryLinear.PATHS)
@pytest.mark.parametrize("shape", [(96, 40), (256, 128), (300, 7)])
def test_ternary_linear_equals_bitlinear_eval_and_stays_packed(path, shape):
    """Every kernel path computes BitLinear's eval function; the native kernel and the int8 path
    give the same bits as the float reference path (the integer product is exact in each)."""
    if path == "native" and kernels.library() is None:
        pytest.skip(f"native kernels unavailable ({kernels.unavailable_reason()})")
    torch.manual_seed(0)
    k, n = shape
    for per_channel in (False, True):
        bl = BitLinear(k, n, per_channel=per_channel).eval()
        tl = TernaryLinear.from_float(bl.weight, per_channel)
        for m in (1, 5, 33):  # decode, small batch, a tile remainder
            x = torch.randn(m, 3, k)
            y = tl(x, path=path)
            assert torch.allclose(y, bl(x), atol=1e-5, rtol=1e-5)
            assert torch.equal(y, tl(x, path="float"))
        assert tl.packed.dtype == torch.uint8 and tl.packed.numel() == n * (-(-k // 128) * 128) // 4  # 2 bits
        assert not any(b.is_floating_point() and b.numel() > n for b in tl.buffers())
        assert torch.equal(dequantized_weight(tl), bl.ternary_weight())


@pytest.mark.skipif(TernaryLinear(1, 1, torch.zeros(1, 32, dtype=torch.uint8), torch.ones(())).path != "native",
                    reason="native kernels unavailable on this machine")
def test_ternary_council_runs_experts_grouped_with_the_same_bits(exported):
    """The ternary export's council layers run every expert in three grouped kernel calls; the
    logits have the bits of the one-expert-at-a-time loop, and the experts' weights are views."""
    model, path = exported["ternary"]
    reloaded, _ = load(path)
    ids = torch.randint(4, 384, (3, 9), generator=torch.Generator().manual_seed(3))
    councils = [b.ffn for b in reloaded.blocks if b.council]
    assert councils and all(c.grouped_experts is not None for c in councils)
    stacked = councils[0].grouped_experts.weights["w1"][0]
    assert councils[0].experts[1].w1.packed.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    with torch.no_grad():
        grouped = reloaded(ids).logits
        for c in councils:
            c.grouped_experts = None
        assert torch.equal(grouped, reloaded(ids).logits)
    assert all(b.ffn.grouped_experts is None for b in exported["int4"][0].blocks if b.council)


def test_int8_rows_round_trip():
    w = torch.randn(2, 5, 8)
    bank = Int8Rows.from_float(w)
    assert bank.q.dtype == torch.int8
    assert (bank[1] - w[1]).abs().max() <= w.abs().amax() / 127
    assert torch.equal(bank.rows(torch.tensor([6])), bank.dequantized()[1, 1:2])  # flattened row 6 = (1, 1)
    with pytest.raises(ValueError, match="one scale per row"):
        Int8Rows(bank.q, bank.scale[..., 0])


def test_fp16_copy_is_trainable(exported):
    model, _ = exported["fp16"]
    m = copy.deepcopy(model).train()
    for p in m.parameters():
        p.requires_grad_(True)
    m(torch.randint(4, 384, (2, 8))).logits.sum().backward()
    assert m.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_corrupted_exports_fail_with_the_file_named(exported, tmp_path):
    import shutil

    from quillan.checkpoint import write_checksums

    src = exported["ternary"][1]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    weights, meta_path = bad / "model.safetensors", bad / "metadata.json"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 differs from checksums.json"):
        load(bad)
    flipped = bytearray(original)
    flipped[-100] ^= 0x10  # one bit inside the tensor data: safetensors itself would load this
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 differs .* corrupted"):
        load(bad)

    def rewrite_with_true_checksum(tensors):  # a consistent file whose content is wrong
        save_file(tensors, str(weights))
        write_checksums(bad, ["model.safetensors", "metadata.json"])

    weights.write_bytes(original)
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith(".packed"))
    tensors[key] = tensors[key][:-1]  # packed length does not match its shape
    rewrite_with_true_checksum(tensors)
    with pytest.raises(CheckpointError, match="packed length"):
        load(bad)
    weights.write_bytes(original)
    meta = json.loads((src / "metadata.json").read_text())
    name = next(iter(meta["shapes"]))
    meta["shapes"][name] = [meta["shapes"][name][0] * 2, meta["shapes"][name][1]]  # lies about a shape
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="metadata.json: sha256 differs from checksums.json"):
        load(bad)  # an edited metadata.json is caught like edited weights
    write_checksums(bad, ["model.safetensors", "metadata.json"])
    with pytest.raises(CheckpointError, match=name):
        load(bad)  # and with checksums that agree, the shape check names the module
    truncated = bytes(original[: len(original) // 2])
    weights.write_bytes(truncated)
    write_checksums(bad, ["model.safetensors", "metadata.json"])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        load(bad)  # a truncated file with a matching checksum still fails as unreadable


def test_quality_gate_and_champion():
    acc = {"unquantized": 0.50, "ternary": 0.48, "int4": 0.35, "int8": 0.50}
    assert gate_failures(acc, "unquantized", 0.10) == pytest.approx({"int4": 0.15})
    rows = {"ternary": {"accuracy": 0.48, "size_bytes": 10}, "int8": {"accuracy": 0.50, "size_bytes": 40},
            "fp16": {"accuracy": 0.50, "size_bytes": 80}}
    assert pick_champion(rows, ["ternary", "int8", "fp16"], "accuracy") == "int8"  # tie with fp16: smaller wins
    assert pick_champion(rows, ["ternary", "int8"], "size_bytes") == "ternary"
    assert pick_champion(rows, [], "accuracy") is None


def test_champion_ties_within_paired_standard_errors_go_to_the_smaller():
    # 100 records: int8 right on 50, ternary on 48 (int8's hits but two), fp16 on int8's 50 plus 6 more.
    int8 = [1] * 50 + [0] * 50
    ternary = [1] * 48 + [0] * 52
    fp16 = [1] * 56 + [0] * 44
    outcomes = {"ternary": ternary, "int8": int8, "fp16": fp16}
    rows = {v: {"accuracy": sum(o) / 100, "size_bytes": size} for (v, o), size in zip(outcomes.items(), (10, 40, 80))}
    # int8 vs ternary: 2 discordant records, paired SE = sqrt((2 - 100 * 0.02**2) / 99 / 100) = 0.01407.
    assert paired_standard_error(ternary, int8) == pytest.approx(0.014071, abs=1e-6)
    # fp16 vs ternary: gap 0.08 over 8 discordant records, SE 0.02727: 2.93 SEs apart.
    assert pick_champion(rows, list(rows), "accuracy", outcomes, tolerance_se=2.0) == "fp16"
    assert pick_champion(rows, list(rows), "accuracy", outcomes, tolerance_se=3.0) == "ternary"
    # Without fp16, ternary is 0.02 / 0.01407 = 1.42 SEs below int8: tied at 2, not at 1.
    two = {v: rows[v] for v in ("ternary", "int8")}
    assert pick_champion(two, list(two), "accuracy", outcomes, tolerance_se=2.0) == "ternary"
    assert pick_champion(two, list(two), "accuracy", outcomes, tolerance_se=1.0) == "int8"
    assert pick_champion(two, list(two), "accuracy", outcomes, tolerance_se=0.0) == "int8"
    assert pick_champion(two, list(two), "accuracy") == "int8"  # no outcomes: exact ties only
    assert "within 2 paired standard errors" in champion_rule("accuracy", 2.0)
    assert champion_rule("accuracy", 0.0) == "best accuracy; exact ties go to the smaller"


def _reloaded_variants(base, tmp_path):
    """Each variant of `base` converted, saved and reloaded: {variant: reloaded model}. Asserts the
    reload computes what the converted model does, within 5 % of the source model's logits."""
    ids = torch.randint(4, 384, (2, 10), generator=torch.Generator().manual_seed(4))
    out = {}
    with torch.no_grad():
        ref = base(ids).logits
        for v in VARIANTS:
            model, plan = convert(copy.deepcopy(base), v, ExportConfig())
            save(model, tmp_path / v, v, plan, {})
            reloaded, _ = load(tmp_path / v)
            logits = reloaded(ids).logits
            assert torch.allclose(logits, model(ids).logits, atol=1e-5), v
            assert (logits - ref).abs().max() < 0.05 * ref.abs().max(), v
            out[v] = reloaded
    return out


def test_tequila_models_export_their_dead_zone_bias_in_every_variant(tmp_path):
    torch.manual_seed(0)
    base = Quillan(QuillanConfig.preset("smoke", vocab_size=384, quant_method="tequila", tequila_lambda=0.05)).eval()
    reloaded = _reloaded_variants(base, tmp_path)
    layer = reloaded["ternary"].get_submodule("blocks.0.attn.q_proj")
    assert torch.allclose(layer.bias, base.get_submodule("blocks.0.attn.q_proj").dead_zone_bias())
    assert reloaded["fp16"].cfg.linear_bias and reloaded["fp16"].cfg.quant_method == "absmean"


def test_adaptive_plan_exports_binary_agent_banks_in_every_variant(tmp_path):
    torch.manual_seed(0)
    base = Quillan(QuillanConfig.preset("smoke", vocab_size=384, quant_plan="adaptive")).eval()
    with torch.no_grad():  # micro_up starts at zero; give the agents weights to binarize
        for m in base.modules():
            if getattr(m, "binary_weights", False):
                m.micro_up.normal_(0, 0.02)
    for v, reloaded in _reloaded_variants(base, tmp_path).items():
        if v in ("ternary", "fp16"):  # banks stored as float: each agent row holds two values
            bank = reloaded.blocks[-1].ffn.micro_down
            assert all(len(row.abs().unique()) == 1 for row in bank.reshape(-1, bank.shape[-1])), v
        assert reloaded.blocks[-1].ffn.binary_weights == (v != "fp16"), v


def test_digit_models_export_their_digit_embedding_and_order_in_every_variant(tmp_path):
    torch.manual_seed(0)
    base = Quillan(QuillanConfig.preset("smoke", vocab_size=384, digit_order="lsb", digit_positions=8,
                                        digit_ids=tuple(range(20, 30)))).eval()
    ids = torch.tensor([[5, 20, 21, 22, 6, 29, 7]])
    for v, reloaded in _reloaded_variants(base, tmp_path).items():
        assert (reloaded.cfg.digit_order, reloaded.cfg.digit_ids) == ("lsb", tuple(range(20, 30))), v
        assert torch.equal(reloaded.digit_embed.weight, base.digit_embed.weight.half().float()), v
        with torch.no_grad():
            assert (reloaded(ids).logits - base(ids).logits).abs().max() < 0.05 * base(ids).logits.abs().max(), v


def test_int8_head_exports_reload_and_keep_the_embedding_float(base, tmp_path):
    from quillan.export.layers import Int8Head

    cfg = ExportConfig(int8_head=True)
    ids = torch.randint(4, 384, (2, 10), generator=torch.Generator().manual_seed(5))
    for v in VARIANTS:
        model, plan = convert(copy.deepcopy(base), v, cfg)
        assert (plan.get("head"), isinstance(model.head, Int8Head)) == ((None, False) if v == "fp16" else ("int8", True)), v
        meta = save(model, tmp_path / v, v, plan, {})
        reloaded, _ = load(tmp_path / v)
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, model(ids).logits) or v == "fp16", v
            ref = base(ids).logits
            assert (reloaded(ids).logits - ref).abs().max() < 0.05 * ref.abs().max(), v
        if v != "fp16":
            assert meta["shapes"]["head"] == [384, base.cfg.dim]
            assert torch.equal(reloaded.embed.weight, base.embed.weight.half().float())  # the input side stays FP16
            assert torch.equal(reloaded.head.q, model.head.q) and reloaded.head.q.dtype == torch.int8


def _int4_layers(model):
    from quillan.export.bnb_layers import Int4Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}


@pytest.mark.parametrize("variant", ["int4", "mixed"])
def test_int4_layers_fit_bitsandbytes_cpu_repacking(exported, variant):
    """bitsandbytes' AVX512-BF16 path repacks each 4-bit weight (pure Python, so checked on any CPU):
    every INT4 layer of the smoke exports must be accepted, and where the CPU takes that path, the
    repacked inference-mode forward must compute the same layer as the plain one."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, _convert_weight_packed_for_cpu, has_avx512bf16

    model, path = exported[variant]
    reloaded, _ = load(path)
    lin4 = [m for m in reloaded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin4) == sum(p == "int4" for p in json.loads((path / "metadata.json").read_text())["modules"].values())
    for m in lin4:  # freshly loaded: nothing repacked yet
        state = copy.deepcopy(m.weight.quant_state)
        packed, state = _convert_weight_packed_for_cpu(m.weight.data.clone(), state)
        assert packed.shape == (m.out_features, m.in_features // 2)
    layers = _int4_layers(reloaded)
    if not has_avx512bf16():
        return
    for name, m in layers.items():
        x = torch.randn(7, m.in_features, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            m.train()  # training mode: bitsandbytes' plain dequantize + matmul
            plain = m(x)
            m.eval()
        with torch.inference_mode():
            repacked = m(x)
        assert getattr(m.inner.weight.quant_state, "packing_format_for_cpu", False), name
        # the repacked kernel computes in BF16 with BF16 block scales: float tolerance of BF16
        assert (repacked - plain).norm() <= 2e-2 * plain.norm(), name
        assert torch.equal(m.dequantized(), dequantized_weight(m)), name  # stored form untouched


def test_int4_export_of_shapes_bitsandbytes_does_not_block(tmp_path):
    """Experts of 48 hidden units and a model width of 40: no dimension a multiple of 32 or 64. The
    INT4 layers are stored zero-padded (metadata says so), reload, and compute the unpadded layer."""
    from quillan.export.bnb_layers import int4_padded_shape

    torch.manual_seed(0)
    base = Quillan(QuillanConfig.preset("smoke", vocab_size=384, expert_hidden=48, dim=40, n_heads=4, n_kv_heads=2)).eval()
    model, plan = convert(copy.deepcopy(base), "int4", ExportConfig())
    save(model, tmp_path, "int4", plan, {})
    meta = json.loads((tmp_path / "metadata.json").read_text())
    w1 = next(n for n in plan if n.endswith("experts.0.w1"))
    assert meta["shapes"][w1] == [48, 40] and meta["int4_padded_shapes"][w1] == list(int4_padded_shape(48, 40)) == [64, 64]
    reloaded, _ = load(tmp_path)
    ids = torch.randint(4, 384, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():  # on AVX512-BF16 CPUs: bitsandbytes' repacking path
        logits = reloaded(ids).logits
        ref = base(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
    for name, m in _int4_layers(reloaded).items():
        src = base.get_submodule(name).ternary_weight()
        assert dequantized_weight(m).shape == src.shape
        assert (dequantized_weight(m) - src).norm() < 0.2 * src.norm(), name  # NF4 of the ternary weights


def test_memory_probe_and_size_of_a_stored_export(exported):
    """A fresh process loads the export and reports its peak RSS; size and bits come from disk."""
    from quillan.export.memory import peak_rss, size_and_bits

    model, path = exported["ternary"]
    rss = peak_rss(path)
    assert rss["peak_rss_bytes"] > rss["model_rss_bytes"] > 0
    size, bits = size_and_bits(path, model)
    assert size == (path / "model.safetensors").stat().st_size
    assert bits == json.loads((path / "metadata.json").read_text())["bits_per_weight_overall"]


def test_int8_head_is_the_exact_integer_product():
    """Int8Head: per-row int8 weights (absmax/127), per-token int8 activations, int32 product:
    the same bits as the int64 product rescaled, and within 1 % of the float head's logits."""
    from quillan.bitnet import activation_quantize
    from quillan.export.layers import Int8Head

    torch.manual_seed(0)
    w, x = torch.randn(260, 128) * 0.05, torch.randn(2, 5, 128)
    head = Int8Head.from_float(w)
    assert head.q.dtype == torch.int8 and int(head.q.abs().max()) == 127
    assert torch.equal(head.scale, w.abs().amax(1, keepdim=True) / 127.0)
    y = head(x)
    assert y.shape == (2, 5, 260)
    xq, xs = activation_quantize(x.reshape(-1, 128))
    exact = ((xq.long() @ head.q.long().t()).float() * xs) * head.scale.view(1, -1)
    assert torch.equal(y.reshape(-1, 260), exact)
    ref = x @ w.t()
    assert float((y - ref).norm() / ref.norm()) < 0.01
    with pytest.raises(ValueError, match="need int8 q"):
        Int8Head(head.q.float(), head.scale)
