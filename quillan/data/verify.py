"""Verifiers: recompute every task's answer from its spec, and score completions.

A record's `verifier` field holds what its checker needs (`{"kind": ..., ...}`); the answer is
recomputed from that alone, so a record whose `answer` was corrupted fails verification.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from quillan.data.code_expr import evaluate

ANSWER_MARK = "Answer:"


def _fmt_list(xs: list) -> str:
    return ", ".join(str(x) for x in xs)


def expected_answer(spec: dict[str, Any]) -> str:
    """The correct answer string of a task, recomputed from its verifier spec."""
    kind = spec.get("kind")
    if kind == "arith":
        a, b, op = spec["a"], spec["b"], spec["op"]
        return str({"add": a + b, "sub": a - b, "mul": a * b}[op])
    if kind == "code":
        return repr(evaluate(spec["expr"]))
    if kind == "reasoning":
        return _reasoning_answer(spec)
    if kind == "writing":
        return _writing_answer(spec)
    raise ValueError(f"unknown verifier kind {kind!r}")


def _reasoning_answer(spec: dict[str, Any]) -> str:
    task, items = spec["task"], spec["items"]
    if task == "max":
        return str(max(items))
    if task == "min":
        return str(min(items))
    if task == "greater":
        return "yes" if items[0] > items[1] else "no"
    if task == "sort":
        return _fmt_list(sorted(items, reverse=spec["order"] == "desc"))
    if task == "count_even":
        return str(sum(1 for x in items if x % 2 == 0))
    if task == "count_gt":
        return str(sum(1 for x in items if x > spec["threshold"]))
    if task == "next":
        return str(_next_in_sequence(items, spec["rule"]))
    raise ValueError(f"unknown reasoning task {task!r}")


def _next_in_sequence(items: list[int], rule: str) -> int:
    if rule == "arith":
        return items[-1] + (items[1] - items[0])
    if rule == "geom":
        return items[-1] * (items[1] // items[0])
    if rule == "alt":  # two interleaved arithmetic sequences: continue the one two back
        return items[-2] + (items[-2] - items[-4])
    raise ValueError(f"unknown sequence rule {rule!r}")


def _writing_answer(spec: dict[str, Any]) -> str:
    task, text = spec["task"], spec["text"]
    if task == "reverse":
        return text[::-1]
    if task == "upper":
        return text.upper()
    if task == "capitalize":
        return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    if task == "count_letter":
        return str(text.count(spec["letter"]))
    if task == "length":
        return str(len(text))
    if task == "word_count":
        return str(len(text.split()))
    if task == "acronym":
        return "".join(w[0].upper() for w in text.split())
    if task == "sort_words":
        return " ".join(sorted(text.split()))
    raise ValueError(f"unknown writing task {task!r}")


def extract_answer(completion: str) -> str:
    """The final answer in a completion: the text after the last "Answer:" if any, else all."""
    if ANSWER_MARK in completion:
        completion = completion.rsplit(ANSWER_MARK, 1)[1]
    return completion.strip()


def normalize_answer(text: str) -> str:
    """Answer comparison form: NFKC, whitespace collapsed, trailing period dropped."""
    text = unicodedata.normalize("NFKC", text).strip()
    text = re.sub(r"\s+", " ", text)
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


def is_correct(record: dict[str, Any], completion: str) -> bool:
    """Whether a model completion answers the record's task correctly (exact match)."""
    return normalize_answer(extract_answer(completion)) == normalize_answer(record["answer"])


def verify_record(record: dict[str, Any]) -> bool:
    """A record is valid when its answer equals the recomputed one and its target ends in it."""
    spec = record.get("verifier")
    if not isinstance(spec, dict):  # missing or null: nothing to recompute the answer from
        return False
    try:
        want = expected_answer(spec)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
        return False
    target = record.get("target")
    return record.get("answer") == want and isinstance(target, str) and is_correct(record, target)
