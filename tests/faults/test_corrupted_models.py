"""Corrupted model directories (models/train, models/grpo and their checkpoints) fail to load with
the file named: truncated, bit-flipped, missing, or a config that lies about shapes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quillan.checkpoint import CHECKSUMS, CheckpointError, file_sha256, load_model_dir, save_model_dir
from quillan.config import QuillanConfig
from quillan.model import Quillan


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke")).eval()
    directory = tmp_path_factory.mktemp("model") / "train"
    save_model_dir(directory, model)
    return directory, model


@pytest.fixture
def bad(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "bad")


def test_round_trip_and_checksums_written(saved):
    directory, model = saved
    sums = json.loads((directory / CHECKSUMS).read_text())
    assert set(sums) == {"model.safetensors", "config.json"}
    assert sums["model.safetensors"] == file_sha256(directory / "model.safetensors")
    loaded, _ = load_model_dir(directory)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_truncated_weights(bad):
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors: sha256 differs from checksums.json"):
        load_model_dir(bad)


def test_one_flipped_bit_in_tensor_data(bad):
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor's float data: safetensors alone would load it
    weights.write_bytes(bytes(data))
    assert len(load_file(str(weights))) > 0  # the format is intact; only the checksum sees the flip
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 differs .* corrupted or was replaced"):
        load_model_dir(bad)


def test_missing_or_broken_checksums(bad):
    (bad / CHECKSUMS).write_text("{not json")
    with pytest.raises(CheckpointError, match="checksums.json: not valid JSON"):
        load_model_dir(bad)
    (bad / CHECKSUMS).unlink()
    with pytest.raises(CheckpointError, match="checksums.json: file not found"):
        load_model_dir(bad)


def test_missing_weights(bad):
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: file not found"):
        load_model_dir(bad)


def _rewrite_checksums(directory):
    names = json.loads((directory / CHECKSUMS).read_text())
    (directory / CHECKSUMS).write_text(json.dumps({n: file_sha256(directory / n) for n in names}))


def test_config_that_lies_about_shapes(bad):
    cfg = json.loads((bad / "config.json").read_text())
    cfg["dim"] *= 2  # consistent checksums, wrong architecture
    (bad / "config.json").write_text(json.dumps(cfg))
    _rewrite_checksums(bad)
    with pytest.raises(CheckpointError, match=r"model.safetensors: does not match .*config.json: .*size mismatch"):
        load_model_dir(bad)


def test_tensor_missing_from_a_consistent_file(bad):
    weights = bad / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(weights))
    _rewrite_checksums(bad)
    with pytest.raises(CheckpointError, match=f"missing \\['{dropped}'\\]"):
        load_model_dir(bad)


def test_unreadable_weights_with_a_matching_checksum(bad):
    weights = bad / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # header says 8 bytes, file has 2
    _rewrite_checksums(bad)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        load_model_dir(bad)
