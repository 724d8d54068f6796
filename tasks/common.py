"""What every stage shares: repo paths, atomic writes, metrics files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

def project_root() -> Path:
    """The project a command works on: $QUILLAN_ROOT, else the nearest directory at or above
    the working directory holding dvc.yaml and params.yaml (DVC runs stages there, also in
    `dvc exp run --temp` copies), else this source checkout."""
    env = os.environ.get("QUILLAN_ROOT")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "dvc.yaml").is_file() and (d / "params.yaml").is_file():
            return d
    return Path(__file__).resolve().parent.parent


ROOT = project_root()
METRICS_DIR = ROOT / "metrics"
PLOTS_DIR = ROOT / "plots"
REPORTS_DIR = ROOT / "reports"


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `target` in one rename.

    Works for files and directories. On any exception the temporary is removed and the
    previous `target` (if any) is left untouched, so DVC never sees a half-written output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if not staged.exists():
            raise RuntimeError(f"nothing was written for {target}")
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staged, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, obj: Any) -> None:
    """Pretty, key-sorted JSON (stable bytes for a given object), written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad line raises ValueError naming the file and line number."""
    rows = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_metrics(stage: str, metrics: dict[str, Any]) -> Path:
    path = METRICS_DIR / f"{stage}.json"
    write_json(path, metrics)
    return path


def leaves(tree: dict[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    """Every non-dict value of a nested dict under its joined key path, e.g. {"a<sep>b": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, sep, name + sep))
        else:
            out[name] = value
    return out


def numeric_leaves(tree: dict[str, Any]) -> dict[str, float]:
    """Flatten nested metrics to {"a/b/c": value} for the numeric (non-bool) leaves."""
    return {k: float(v) for k, v in leaves(tree, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
