"""Model directories: `model.safetensors` + `config.json` (+ `tokenizer.json`) + `checksums.json`.
No pickles. Exports (quillan.export) carry the same `checksums.json`.

Layout shared by models/train/, models/grpo/ and anything that loads a Quillan model.
safetensors has no checksum of its own, so a flipped bit in tensor data would load silently:
`checksums.json` holds the sha256 of every file written here and loading verifies them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from quillan.config import QuillanConfig
from quillan.model import Quillan

WEIGHTS, CONFIG, TOKENIZER, CHECKSUMS = "model.safetensors", "config.json", "tokenizer.json", "checksums.json"


class CheckpointError(ValueError):
    """A model directory is missing a file or holds something that does not fit."""


def save_model_dir(directory: Path | str, model: Quillan, tokenizer: Tokenizer | None = None) -> None:
    """Write weights, config and tokenizer into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_for_saving(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER), pretty=True)
    write_checksums(directory, [WEIGHTS, CONFIG] + ([TOKENIZER] if tokenizer is not None else []))


def write_checksums(directory: Path | str, names: list[str]) -> None:
    """`checksums.json` in `directory`: the sha256 of each named file there (model directories
    and exports alike; `verify_checksums` checks them on load)."""
    directory = Path(directory)
    sums = {name: file_sha256(directory / name) for name in names}
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in chunks)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_json_file(path: Path, what: str) -> Any:
    """The parsed JSON of `path`; CheckpointError naming the file if missing or malformed.
    `what` completes "is <directory> <what>?" in the missing-file message."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found (is {path.parent} {what}?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None


def verify_checksums(directory: Path | str) -> None:
    """Raise CheckpointError naming the file if any file listed in `checksums.json` is missing
    or its sha256 differs (truncated, bit-flipped or replaced)."""
    directory = Path(directory)
    sums = read_json_file(directory / CHECKSUMS, "a Quillan model directory or export")
    if not isinstance(sums, dict) or WEIGHTS not in sums:
        raise CheckpointError(f"{directory / CHECKSUMS}: expected an object with the sha256 of {WEIGHTS}")
    for name, expected in sorted(sums.items()):
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path}: file not found (listed in {CHECKSUMS})")
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path}: sha256 differs from {CHECKSUMS}: the file is corrupted or was "
                                  f"replaced; re-run the stage that wrote {directory}")


def state_for_saving(model: Quillan) -> dict[str, torch.Tensor]:
    """The state dict without the tied head (it is the embedding), contiguous, in sorted order:
    the same weights always give the same file bytes."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("head.weight", None)
    return {k: sd[k].detach().contiguous() for k in sorted(sd)}


def load_config(directory: Path | str) -> QuillanConfig:
    path = Path(directory) / CONFIG
    data = read_json_file(path, "a Quillan model directory")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config keys")
    unknown = set(data) - QuillanConfig.field_names()
    if unknown:
        raise CheckpointError(f"{path}: unknown config keys {sorted(unknown)}")
    try:
        return QuillanConfig(**data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_weights(model: Quillan, state: dict[str, torch.Tensor], weights: Path, config: Path,
                 skip: tuple[str, ...] = (), assign: bool = False) -> None:
    """Put stored tensors into `model` (copied in place; `assign=True` for a model built on the
    meta device, inference only since it unties the head): the tied head gets the embedding, and
    CheckpointError naming `weights` and `config` if keys or shapes do not fit. Keys under a
    prefix in `skip` belong to modules the caller rebuilt itself."""
    if model.cfg.tie_embeddings and "embed.weight" in state and not "head.weight".startswith(skip):
        state["head.weight"] = state["embed.weight"]  # (an export's int8 head was rebuilt by the caller)
    expected = {k for k in model.state_dict() if not k.startswith(skip)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not match {config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=not skip, assign=assign)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{weights}: does not match {config}: {str(e).splitlines()[-1].strip()}") from None


def load_any(path: Path | str) -> tuple[nn.Module, Tokenizer | None]:
    """A runnable model and its tokenizer from any model directory: an export (metadata.json,
    `quillan.export.load`) or a Quillan model directory (`load_model_dir`)."""
    path = Path(path)
    if (path / "metadata.json").exists():
        from quillan.export import load  # the export package imports this module

        return load(path)
    return load_model_dir(path)


def load_model_dir(directory: Path | str, device: str | torch.device = "cpu") -> tuple[Quillan, Tokenizer | None]:
    """The model (eval mode) and its tokenizer (None if the directory has none).

    Raises CheckpointError naming the file for a missing, truncated, bit-flipped or mismatched file.
    """
    directory = Path(directory)
    cfg = load_config(directory)
    verify_checksums(directory)
    model = Quillan(cfg)
    weights = directory / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights}: file not found")
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{weights}: cannot read weights ({type(e).__name__}: {e})") from None
    load_weights(model, state, weights, directory / CONFIG)
    tok_path = directory / TOKENIZER
    tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path.exists() else None
    return model.to(device).eval(), tokenizer
