"""Memory and size of a stored model: the peak resident memory of a fresh process that loads it
(`peak_rss`, run as `python -m quillan.export.memory MODEL_DIR`), and bytes and bits per weight on
disk (`size_and_bits`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import quillan
from quillan.checkpoint import load_any

def size_and_bits(path: Path, model) -> tuple[int, float]:
    """Bytes of the directory's safetensors files, and bits per weight overall: an export's
    metadata value, else 8 · bytes / parameters."""
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if (path / "metadata.json").exists():
        return size, json.loads((path / "metadata.json").read_text())["bits_per_weight_overall"]
    return size, 8 * size / model.num_parameters()


def peak_rss(path: Path) -> dict[str, int]:
    """Peak resident memory (VmHWM) of a fresh process that loads the model and runs one forward
    pass, and the part of it above the peak before loading (interpreter + libraries)."""
    # The child imports this same quillan, wherever it is installed or checked out.
    here = str(Path(quillan.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "quillan.export.memory", str(path)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {path} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_all(paths: dict[str, Path], workers: int = 2) -> dict[str, dict[str, int]]:
    """`peak_rss` of every model, probes two at a time: each is a separate process, so running
    them side by side does not change what each one measures, only the wall time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(peak_rss, paths.values())))


def _vm_hwm() -> int:
    """This process's peak RSS in bytes. VmHWM, not getrusage: ru_maxrss survives exec, so a child
    would report its parent's peak at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _probe(path: str) -> None:
    import quillan.export  # noqa: F401  (the libraries a load needs, before the baseline)
    meta = Path(path) / "metadata.json"
    if meta.exists() and any(p in meta.read_text() for p in ('"int8"', '"int4"')):
        import bitsandbytes  # noqa: F401
    base = _vm_hwm()
    model, _ = load_any(Path(path))
    with torch.no_grad():
        model(torch.ones(1, 16, dtype=torch.long))
    peak = _vm_hwm()
    print(json.dumps({"peak_rss_bytes": peak, "model_rss_bytes": peak - base}))




if __name__ == "__main__":  # the memory probe: python -m quillan.export.memory MODEL_DIR
    _probe(sys.argv[1])
