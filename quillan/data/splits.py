"""Train/val/test splits, stratified by (domain, difficulty), with no prompt in two splits."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from quillan.data.filters import normalize_text

SPLITS = ("train", "val", "test")
Record = dict[str, Any]


def split_records(records: list[Record], val_frac: float, test_frac: float,
                  seed: int) -> dict[str, list[Record]]:
    """`{"train": [...], "val": [...], "test": [...]}`.

    Each (domain, difficulty) cell is shuffled with its own seeded RNG and cut by the
    fractions, so every split has the same domain/difficulty mix. Records are grouped by
    normalised prompt first: all copies of a prompt land in the same split.
    """
    cells: dict[tuple[str, int], dict[str, list[Record]]] = defaultdict(dict)
    for rec in records:
        key = normalize_text(rec["prompt"])
        cells[(rec["domain"], rec["difficulty"])].setdefault(key, []).append(rec)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for cell in sorted(cells):
        groups = [cells[cell][k] for k in sorted(cells[cell])]
        random.Random(f"{seed}/split/{cell[0]}/{cell[1]}").shuffle(groups)
        n = len(groups)
        n_test, n_val = round(n * test_frac), round(n * val_frac)
        parts = {"test": groups[:n_test], "val": groups[n_test : n_test + n_val],
                 "train": groups[n_test + n_val :]}
        for name, part in parts.items():
            out[name].extend(r for g in part for r in g)
    for name in SPLITS:  # one interleaved order, stable for a given seed
        random.Random(f"{seed}/order/{name}").shuffle(out[name])
    return out


def stratified_sample(records: list[dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """Up to `size` records, the same share from every (domain, difficulty) cell, deterministic."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in records:
        cells[(r["domain"], r["difficulty"])].append(r)
    keys = sorted(cells)
    per_cell, extra = divmod(min(size, len(records)), len(keys))
    out = []
    for i, key in enumerate(keys):
        rows = list(cells[key])
        random.Random(f"{seed}/calib/{key}").shuffle(rows)
        out.extend(rows[: per_cell + (i < extra)])
    return out
