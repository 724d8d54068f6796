import pytest

from quillan.data.code_expr import build_expression, evaluate, render
from quillan.data.generators import generate_tasks, worked_steps
from quillan.data.verify import expected_answer, extract_answer, is_correct, verify_record


@pytest.mark.parametrize("spec, want", [
    ({"kind": "arith", "op": "add", "a": 347, "b": 285}, "632"),
    ({"kind": "arith", "op": "sub", "a": 12, "b": 30}, "-18"),
    ({"kind": "arith", "op": "mul", "a": 34, "b": 27}, "918"),
    ({"kind": "code", "expr": ["call", "sum", ["comp", "mul", ["lit", 2], ["lit", [1, 2, 3]]]]}, "12"),
    ({"kind": "code", "expr": ["rev", ["method", "upper", ["lit", "abc"]]]}, "'CBA'"),
    ({"kind": "code", "expr": ["slice", ["lit", [5, 6, 7, 8]], ["lit", 1], ["lit", 3]]}, "[6, 7]"),
    ({"kind": "reasoning", "task": "sort", "items": [3, 1, 2], "order": "desc"}, "3, 2, 1"),
    ({"kind": "reasoning", "task": "count_even", "items": [3, 8, 10, 7]}, "2"),
    ({"kind": "reasoning", "task": "greater", "items": [4, 9]}, "no"),
    ({"kind": "reasoning", "task": "next", "items": [2, 5, 8, 11], "rule": "arith"}, "14"),
    ({"kind": "reasoning", "task": "next", "items": [3, 6, 12, 24], "rule": "geom"}, "48"),
    ({"kind": "reasoning", "task": "next", "items": [1, 40, 3, 38, 5], "rule": "alt"}, "36"),
    ({"kind": "writing", "task": "reverse", "text": "planet"}, "tenalp"),
    ({"kind": "writing", "task": "capitalize", "text": "the quick fox"}, "The Quick Fox"),
    ({"kind": "writing", "task": "count_letter", "text": "banana", "letter": "a"}, "3"),
    ({"kind": "writing", "task": "acronym", "text": "red green blue"}, "RGB"),
])
def test_expected_answer_hand_cases(spec, want):
    assert expected_answer(spec) == want


def test_worked_steps_are_arithmetically_right():
    assert worked_steps("mul", 34, 27) == "34 * 27 = 34 * 20 + 34 * 7 = 680 + 238 = 918"
    assert worked_steps("add", 347, 285) == "347 + 200 = 547; 547 + 80 = 627; 627 + 5 = 632"


def test_extract_and_score():
    rec = {"answer": "918"}
    assert extract_answer("34 * 27 = ...\nAnswer: 918") == "918"
    assert is_correct(rec, "work\nAnswer:  918 ")
    assert is_correct(rec, "918.")
    assert not is_correct(rec, "Answer: 919")


def test_every_generated_record_verifies_and_corruption_is_caught():
    records = generate_tasks(90, seed=3)
    assert all(verify_record(r) for r in records)
    bad = dict(records[0], answer=records[0]["answer"] + "1")
    assert not verify_record(bad)
    assert not verify_record(dict(records[0], verifier={"kind": "nope"}))


def test_code_values_by_construction_match_interpreter():
    import random

    rng = random.Random(0)
    for _ in range(500):
        node, value = build_expression(rng, rng.randint(1, 3))
        assert evaluate(node) == value
        assert isinstance(render(node), str)


def test_malicious_prompt_is_never_evaluated(tmp_path, monkeypatch):
    """Generated code is data: a record whose text is hostile Python is checked without running it."""
    import builtins

    def forbidden(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    marker = tmp_path / "pwned"
    evil = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    rec = {"prompt": f"What does `{evil}` evaluate to?", "answer": "None", "target": "None",
           "verifier": {"kind": "code", "expr": ["call", "__import__", ["lit", "os"]]}}
    assert not verify_record(rec)
    assert not marker.exists()
