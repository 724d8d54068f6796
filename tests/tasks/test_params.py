import pytest
import yaml

from tasks.params import ConfigError, available_presets, deep_merge, load_params
from quillan.data.tokenizer import train_tokenizer


def _params(tmp_path, body: dict):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def test_presets_exist_and_validate(tmp_path):
    assert {"smoke", "cpu", "gpu"} <= set(available_presets())
    for name in ("smoke", "cpu", "gpu"):
        assert load_params(_params(tmp_path, {"preset": name})).preset == name


def test_params_override_preset(tmp_path):
    p = load_params(_params(tmp_path, {"preset": "smoke", "data": {"n_per_domain": 33}}))
    assert p.data.n_per_domain == 33
    assert p.data.vocab_size == 384  # still the smoke preset's value


def test_overrides_beat_params_file(tmp_path):
    p = load_params(_params(tmp_path, {"preset": "smoke"}), overrides={"data.val_frac": 0.2})
    assert p.data.val_frac == 0.2


@pytest.mark.parametrize("body, fragment", [
    ({"preset": "smoke", "data": {"n_per_dommain": 5}}, "unknown key 'data.n_per_dommain'"),
    ({"preset": "smoke", "bogus": 1}, "unknown key 'bogus'"),
    ({"preset": "smoke", "data": {"vocab_size": "big"}}, "data.vocab_size: Input should be a valid integer"),
    ({"preset": "smoke", "data": {"near_dup_threshold": 1.5}}, "data.near_dup_threshold: Input should be less than or equal to 1"),
    ({"preset": "smoke", "data": {"domains": ["math", "poetry"]}}, "data.domains.1"),
    ({"preset": "smoke", "data": {"min_tokens": 50, "max_tokens": 40}}, "min_tokens (50) must be < max_tokens (40)"),
    ({"preset": "huge"}, "unknown preset 'huge' (one of: cpu, gpu, smoke)"),
    ({"seed": 1}, "missing key 'preset'"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, body, fragment):
    with pytest.raises(ConfigError) as e:
        load_params(_params(tmp_path, body))
    msg = str(e.value)
    assert fragment in msg
    assert "params.yaml" in msg
    assert len(msg.splitlines()) == 1


def test_bad_yaml_names_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("preset: [smoke\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(p)


def test_deep_merge_does_not_mutate():
    a = {"x": {"y": 1, "z": 2}}
    b = {"x": {"y": 3}}
    assert deep_merge(a, b) == {"x": {"y": 3, "z": 2}}
    assert a == {"x": {"y": 1, "z": 2}}


def test_write_params_keeps_comments_and_records_what_changed(tmp_path):
    from tasks.params import PARAMS_FILE, write_params

    p = tmp_path / "params.yaml"
    p.write_text(PARAMS_FILE.read_text())
    changed = write_params(p, preset="smoke", overrides={"grpo.steps": 3, "seed": 0})
    assert changed == ["grpo.steps", "preset"]  # seed was already 0
    text = p.read_text()
    assert "# GRPO/DAPO on verifiable rewards" in text and "# Quillan pipeline parameters" in text
    loaded = load_params(p)
    assert loaded.preset == "smoke" and loaded.grpo.steps == 3 and loaded.data.vocab_size == 384
    assert write_params(p, preset="smoke") == []


def test_write_params_rejects_bad_values_without_touching_the_file(tmp_path):
    from tasks.params import PARAMS_FILE, write_params

    p = tmp_path / "params.yaml"
    p.write_text(PARAMS_FILE.read_text())
    before = p.read_bytes()
    with pytest.raises(ConfigError, match=r"unknown key 'grpo.stepz'"):
        write_params(p, overrides={"grpo.stepz": 3})
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny'"):
        write_params(p, preset="tiny")
    assert p.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_quant_section_reaches_the_model_config_and_only_there():
    from tasks.params import PARAMS_FILE

    p = load_params(PARAMS_FILE, overrides={"quant.method": "tequila", "quant.tequila_lambda": 0.01,
                                            "quant.plan": "adaptive"})
    tok = train_tokenizer(["What is 12 + 345? Answer: 357"] * 4, vocab_size=300)
    cfg = p.quillan_config(tok)
    assert (cfg.quant_method, cfg.tequila_lambda, cfg.quant_plan, cfg.vocab_size) == ("tequila", 0.01, "adaptive",
                                                                                      tok.get_vocab_size())
    assert cfg.digit_ids == tuple(tok.token_to_id(str(d)) for d in range(10))
    default = load_params(PARAMS_FILE).quillan_config(tok)
    assert (default.quant_method, default.quant_plan) == ("absmean", "uniform")
    with pytest.raises(ConfigError, match=r"quant.plan"):
        load_params(PARAMS_FILE, overrides={"quant.plan": "binary"})
    with pytest.raises(ConfigError, match=r"quant.method"):
        load_params(PARAMS_FILE, overrides={"quant.method": "ternary"})
    with pytest.raises(ConfigError, match=r"unknown key 'model.quant_method'"):
        load_params(PARAMS_FILE, overrides={"model.quant_method": "tequila"})
