"""The pipeline's one typed config: library defaults < preset file < params.yaml < overrides.

`params.yaml` names a preset (`presets/<name>.yaml`, data files that DVC tracks) and may
override any key of it. Unknown keys, wrong types and out-of-range values raise `ConfigError`
with one line per problem naming the file and the dotted key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import typing
from typing import Literal, Optional

import yaml
from tokenizers import Tokenizer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from quillan.bitnet import QuantMethod, QuantPlan
from quillan.calibrate import CalibrateConfig
from quillan.config import PRESETS as MODEL_PRESETS
from quillan.config import QuillanConfig
from quillan.data import DataConfig
from quillan.data.tokenizer import digit_token_ids
from quillan.export import ExportConfig
from quillan.export.measure import BenchmarkConfig
from quillan.rl.config import GRPOConfig
from quillan.train.config import TrainConfig

from tasks.common import ROOT

PRESETS_DIR = ROOT / "presets"
PARAMS_FILE = ROOT / "params.yaml"


class ConfigError(ValueError):
    """A configuration problem; str() is one line per problem."""


# QuillanConfig fields set from other params sections (quant.*) or by the exports, not under `model:`.
NOT_MODEL_PARAMS = {"quant_method": "quant.method", "tequila_lambda": "quant.tequila_lambda", "quant_plan": "quant.plan",
                    "linear_bias": None, "digit_ids": None}


def _model_params_base():
    hints = typing.get_type_hints(QuillanConfig)
    fields = {name: (Optional[hints[name]], None) for name in QuillanConfig.field_names() - set(NOT_MODEL_PARAMS)}
    return create_model("ModelFields", __config__=ConfigDict(extra="forbid"), **fields)


class ModelParams(_model_params_base()):
    """`model:`: a QuillanConfig preset plus any of its fields (vocab_size comes from the tokenizer)."""

    preset: Literal[tuple(MODEL_PRESETS)] = "cpu"  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _consistent(self) -> "ModelParams":
        self.build()  # contradictions (e.g. top-k > experts) fail at load time
        return self

    def build(self, **overrides) -> QuillanConfig:
        """The QuillanConfig: preset, then the keys set here, then `overrides`."""
        set_keys = {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}
        return QuillanConfig.preset(self.preset, **{**set_keys, **overrides})


class QuantParams(BaseModel):
    """`quant:`: how BitLinear weights are quantized in training (and so what the exports compute)."""

    model_config = ConfigDict(extra="forbid")
    method: QuantMethod = Field(
        "absmean", description="absmean: BitNet b1.58 round-clip with the plain STE; tequila: plus the dead-zone "
                               "bias λ·Σ(weights quantized to 0) per output, which gives trapped weights a gradient "
                               "(Huang et al. 2025)")
    tequila_lambda: float = Field(1e-3, ge=0, description="λ of tequila's dead-zone bias")
    plan: QuantPlan = Field(
        "uniform", description="uniform: every BitLinear ternary, routers and micro-agent banks full precision; "
                               "adaptive (seed note 001): micro-agent banks binary (±mean|row|, trained with the "
                               "λ warmup), experts and the rest ternary, overseer and routers full precision")


class Params(BaseModel):
    """Everything `params.yaml` may hold. Sections are the stages' configs."""

    model_config = ConfigDict(extra="forbid")
    preset: str = Field(description="name of a file in presets/ (smoke, cpu, gpu)")
    seed: int = Field(0, ge=0, description="master seed; every stage derives its RNGs from it")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelParams = Field(default_factory=ModelParams)
    quant: QuantParams = Field(default_factory=QuantParams)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)

    def quillan_config(self, tokenizer: Tokenizer) -> QuillanConfig:
        """The model to build: `model:` (preset and fields) with `quant:` and the tokenizer's
        vocabulary and digit ids."""
        return self.model.build(vocab_size=tokenizer.get_vocab_size(), digit_ids=digit_token_ids(tokenizer),
                                quant_method=self.quant.method,
                                tequila_lambda=self.quant.tequila_lambda, quant_plan=self.quant.plan)


def available_presets(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, recursing into dicts; neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> bool:
    """Set `a.b.c = value` inside a nested dict, creating levels as needed (an empty YAML
    section, None, counts as missing); returns whether the value changed."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        if tree.get(key) is None:
            tree[key] = {}
        tree = tree[key]
    if leaf in tree and tree[leaf] == value:
        return False
    tree[leaf] = value
    return True


def display_path(path: Path) -> str:
    """The path relative to the working directory when it lies below it (shorter messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{display_path(path)}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{display_path(path)}: not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{display_path(path)}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _allowed_keys(section: tuple) -> list[str]:
    """The keys a section of params.yaml accepts, e.g. ("grpo",) → GRPOConfig's fields."""
    model: type[BaseModel] = Params
    for part in section:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"][:-1])
            lines.append(f"{source}: unknown key '{key}'" + (f" (allowed: {', '.join(allowed)})" if allowed else ""))
            continue
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e.get("input"), dict) else ""
        lines.append(f"{source}: {key}: {e['msg']}{got}")
    return "\n".join(lines)


def load_params(params_file: Path | str = PARAMS_FILE, *, preset: str | None = None,
                overrides: dict[str, Any] | None = None, presets_dir: Path = PRESETS_DIR) -> Params:
    """The validated config. `preset` replaces params.yaml's `preset:`; `overrides` are dotted keys."""
    params_file = Path(params_file)
    user = _read_yaml(params_file)
    for dotted, value in (overrides or {}).items():
        set_dotted(user, dotted, value)
    name = preset or user.get("preset")
    names = available_presets(presets_dir)
    if not name:
        raise ConfigError(f"{display_path(params_file)}: missing key 'preset' (one of: {', '.join(names)})")
    if name not in names:
        raise ConfigError(f"{display_path(params_file)}: preset: unknown preset {name!r} (one of: {', '.join(names)})")
    preset_path = presets_dir / f"{name}.yaml"
    base = _read_yaml(preset_path)
    try:  # a preset must itself be valid, so its errors name its own file
        Params.model_validate({**base, "preset": name})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, display_path(preset_path))) from None
    merged = deep_merge(base, user)
    merged["preset"] = name
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, display_path(params_file))) from None


def write_params(params_file: Path | str = PARAMS_FILE, *, preset: str | None = None,
                 overrides: dict[str, Any] | None = None) -> list[str]:
    """Write `preset:` and dotted `overrides` into params.yaml, keeping its comments and layout.

    The pipeline runs what params.yaml says, so that dvc.lock records what was run. The result
    is validated before anything is written (ConfigError, file untouched) and the file is
    replaced atomically. Returns the dotted keys whose value changed.
    """
    from ruamel.yaml import YAML  # round-trip YAML (a DVC dependency): comments survive

    params_file = Path(params_file)
    load_params(params_file, preset=preset, overrides=overrides)
    changes = dict(overrides or {})
    if preset is not None:
        changes["preset"] = preset
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_file.read_text())
    changed = [dotted for dotted, value in changes.items() if set_dotted(doc, dotted, value)]
    if changed:
        tmp = params_file.with_name(params_file.name + ".tmp")
        with tmp.open("w") as f:
            rt.dump(doc, f)
        tmp.replace(params_file)
    return changed
