"""tasks.common.atomic_path: an output is replaced whole or not at all."""

import os
import signal
import subprocess
import sys

import pytest

from tasks.common import atomic_path


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_failure_keeps_the_previous_output_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "models" / "train"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert (target / "model.safetensors").read_bytes() == b"old"
    assert _listing(tmp_path / "models") == ["train"]


def test_success_replaces_a_directory_and_a_file(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.json").write_text("{}")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.json").write_text("{}")
    assert _listing(target) == ["new.json"]
    with atomic_path(tmp_path / "metrics.json") as tmp:
        tmp.write_text('{"a": 1}')
    assert (tmp_path / "metrics.json").read_text() == '{"a": 1}'
    assert _listing(tmp_path) == ["metrics.json", "out"]


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="nothing was written"):
        with atomic_path(tmp_path / "x.json"):
            pass
    assert not (tmp_path / "x.json").exists()


def test_a_killed_writer_leaves_only_a_hidden_temporary(tmp_path):
    """SIGKILL mid-write: no `finally` runs, yet the target is either absent or the old one."""
    target = tmp_path / "data.jsonl"
    target.write_text("old\n")
    code = (f"import os, sys\nfrom pathlib import Path\nfrom tasks.common import atomic_path\n"
            f"with atomic_path(Path({str(target)!r})) as tmp:\n"
            f"    tmp.write_text('half')\n    print('writing', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_text() == "old\n"
    leftovers = [n for n in _listing(tmp_path) if n != "data.jsonl"]
    assert all(n.startswith(".data.jsonl.") and n.endswith(".tmp") for n in leftovers) and leftovers
