"""Quality filters for generated records, each one reporting what it removed and why.

Filters run in a fixed order (length, refusal, exact duplicate, near duplicate, verifier);
a record is dropped by the first filter that rejects it, so each drop has one reason.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from quillan.data.verify import verify_record

Record = dict[str, Any]

# Refusals and AI disclaimers that self-generated text picks up (seed note 004's filter list).
REFUSAL_PATTERNS = [
    r"\bas an ai\b", r"\bas a (large )?language model\b", r"\bi('m| am) (just )?an ai\b",
    r"\bi can(no|')t (help|assist|answer|do that|provide)\b", r"\bi('m| am) (sorry|unable)\b",
    r"\bi apologi[sz]e\b", r"\bi do not have (access|the ability)\b", r"\bi don't have (access|the ability)\b",
    r"\bnot able to (help|assist|provide)\b", r"\bagainst (my|the) (guidelines|policy|policies)\b",
    r"\bconsult a (professional|doctor|lawyer)\b",
]
_REFUSAL_RE = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def normalize_text(text: str) -> str:
    """Dedup form: NFKC, lower case, whitespace collapsed, outer punctuation stripped."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .!?;:,")


def has_refusal(text: str) -> bool:
    """Whether the text contains a refusal or AI-disclaimer phrase."""
    return bool(_REFUSAL_RE.search(text))


def text_hash(text: str) -> str:
    """sha1 of the normalised text (exact-duplicate key)."""
    return hashlib.sha1(normalize_text(text).encode()).hexdigest()


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of the normalised text (numbers stay whole tokens, so 12+34 ≠ 12+35)."""
    toks = _TOKEN_RE.findall(normalize_text(text))
    if len(toks) < n:
        return {" ".join(toks)}
    return {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_MERSENNE = (1 << 61) - 1


def minhash_signatures(sets: list[set[str]], num_perm: int, seed: int = 0) -> np.ndarray:
    """MinHash signatures, shape (len(sets), num_perm), uint64 (Broder 1997)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _MERSENNE, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, _MERSENNE, size=num_perm, dtype=np.uint64)
    sig = np.full((len(sets), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i, s in enumerate(sets):
        h = np.array([int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "little") % _MERSENNE
                      for x in s], dtype=np.uint64)
        # (a*h + b) mod p in uint64 may wrap; wrapping is still a fixed hash family per (a, b).
        perm = (h[:, None] * a[None, :] + b[None, :]) % np.uint64(_MERSENNE)
        sig[i] = perm.min(axis=0)
    return sig


def near_duplicate_pairs(texts: list[str], threshold: float, num_perm: int = 64, bands: int = 16,
                         seed: int = 0) -> dict[int, int]:
    """Map index → index of an earlier text whose shingle Jaccard ≥ threshold.

    Candidates come from MinHash LSH (`bands` bands of `num_perm // bands` rows); each candidate
    pair is confirmed with the exact Jaccard, so the result has no LSH false positives.
    """
    sets = [shingles(t) for t in texts]
    sig = minhash_signatures(sets, num_perm, seed)
    rows = num_perm // bands
    buckets: dict[tuple, list[int]] = {}
    dup_of: dict[int, int] = {}
    for i in range(len(texts)):
        candidates: list[int] = []
        for band in range(bands):
            key = (band, sig[i, band * rows : (band + 1) * rows].tobytes())
            candidates.extend(buckets.setdefault(key, []))
        for j in sorted(set(candidates)):
            if jaccard(sets[i], sets[j]) >= threshold:
                dup_of[i] = j
                break
        if i not in dup_of:  # only kept texts can be matched later
            for band in range(bands):
                buckets[(band, sig[i, band * rows : (band + 1) * rows].tobytes())].append(i)
    return dup_of


@dataclass
class FilterReport:
    """How many records each filter removed, with a few examples per reason."""

    input_count: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, record: Record) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(record.get("prompt", "")[:120])

    def as_dict(self) -> dict[str, Any]:
        return {"input": self.input_count, "dropped": dict(sorted(self.dropped.items())),
                "kept": self.input_count - sum(self.dropped.values()), "examples": self.examples}


def length_reason(record: Record, min_chars: int, max_chars: int) -> str | None:
    """'too_short'/'too_long' when prompt+target character count is outside the bounds."""
    n = len(record.get("prompt", "")) + len(record.get("target", ""))
    if n < min_chars:
        return "too_short"
    if n > max_chars:
        return "too_long"
    return None


def apply_filters(records: Iterable[Record], *, min_chars: int, max_chars: int,
                  near_dup_threshold: float, report: FilterReport | None = None,
                  verifier: Callable[[Record], bool] = verify_record) -> tuple[list[Record], FilterReport]:
    """Records that pass every quality filter, in input order, and the drop report."""
    report = report or FilterReport()
    records = list(records)
    report.input_count += len(records)
    kept: list[Record] = []
    seen: set[str] = set()
    for rec in records:
        reason = length_reason(rec, min_chars, max_chars)
        if reason is None and (has_refusal(rec.get("prompt", "")) or has_refusal(rec.get("target", ""))):
            reason = "refusal"
        if reason is None:
            h = text_hash(rec["prompt"])
            if h in seen:
                reason = "exact_duplicate"
            seen.add(h)
        if reason:
            report.drop(reason, rec)
        else:
            kept.append(rec)
    dup_of = near_duplicate_pairs([r["prompt"] for r in kept], near_dup_threshold)
    survivors = []
    for i, rec in enumerate(kept):
        if i in dup_of:
            report.drop("near_duplicate", rec)
        elif not verifier(rec):
            report.drop("failed_verifier", rec)
        else:
            survivors.append(rec)
    return survivors, report
