from collections import Counter

from quillan.data.generators import DOMAINS, generate_tasks
from quillan.data.verify import extract_answer, verify_record


def pairs_with_same_prompts_and_answers(base: list[dict], other: list[dict]) -> list[tuple[dict, dict]]:
    """(base, other) record pairs, after asserting that a target format changed only the targets
    and that every target of `other` verifies and ends in its answer."""
    assert [(r["prompt"], r["answer"]) for r in base] == [(r["prompt"], r["answer"]) for r in other]
    for r in other:
        assert verify_record(r) and extract_answer(r["target"]) == r["answer"]
    return list(zip(base, other))


def test_deterministic_and_seed_dependent():
    assert generate_tasks(60, seed=5) == generate_tasks(60, seed=5)
    assert generate_tasks(60, seed=5) != generate_tasks(60, seed=6)


def test_balanced_over_domains_and_difficulties():
    rows = generate_tasks(90, seed=0)
    assert Counter(r["domain"] for r in rows) == {d: 90 for d in DOMAINS}
    assert Counter((r["domain"], r["difficulty"]) for r in rows) == {(d, k): 30 for d in DOMAINS for k in (1, 2, 3)}


def test_many_phrasings_per_task():
    rows = [r for r in generate_tasks(600, seed=0) if r["domain"] == "math" and r["task"] == "add"]
    openings = {r["prompt"].split()[0] for r in rows}
    assert len(openings) >= 5


def test_required_fields():
    for r in generate_tasks(12, seed=0):
        assert set(r) >= {"prompt", "answer", "target", "domain", "difficulty", "task", "verifier"}
        assert r["prompt"] and r["answer"]


def test_reversed_math_writes_digits_least_significant_first_then_the_answer():
    plain = generate_tasks(90, 3, 0.3, ("math",))
    rev = generate_tasks(90, 3, 0.3, ("math",), "reversed")
    for p, r in pairs_with_same_prompts_and_answers(plain, rev):  # same items, other targets
        if "\n" not in p["target"]:  # plain answers become `rev <reversed digits>` + `Answer: N`
            assert r["target"] == f"rev {p['answer'][::-1]}\nAnswer: {p['answer']}"
        else:  # "show your steps" prompts keep their worked steps
            assert r["target"] == p["target"]
    neg = next(r for r in rev if r["answer"].startswith("-"))
    assert neg["target"].startswith(f"rev {neg['answer'][1:][::-1]}-\n")


def test_column_steps_carry_and_borrow():
    import pytest

    from quillan.data.generators import column_steps

    assert column_steps("add", 47, 85) == "7+5+0=2 c1\n4+8+1=3 c1"  # 132: the last carry is the leading 1
    assert column_steps("add", 999, 1) == "9+1+0=0 c1\n9+0+1=0 c1\n9+0+1=0 c1"  # shorter operand padded with 0
    assert column_steps("sub", 65, 36) == "5-6-0=9 c1\n6-3-1=2 c0"  # 29
    assert column_steps("sub", 19, 84) == "neg\n4-9-0=5 c1\n8-1-1=6 c0"  # -(84 - 19) = -65
    assert column_steps("mul", 47, 8) == "7*8+0=6 c5\n4*8+5=7 c3"  # 376: the last carry leads
    assert column_steps("mul", 9, 9) == "9*9+0=1 c8"  # 81
    assert column_steps("mul", 30, 0) == "0*0+0=0 c0\n3*0+0=0 c0"  # 0
    with pytest.raises(ValueError, match="one digit"):
        column_steps("mul", 34, 12)


def test_columns_math_keeps_prompts_and_answers_and_writes_add_sub_as_columns():
    from quillan.data.generators import column_steps

    rev = generate_tasks(90, 3, 0.3, ("math",), "reversed")
    cols = generate_tasks(90, 3, 0.3, ("math",), "columns")
    for r, c in pairs_with_same_prompts_and_answers(rev, cols):
        v = c["verifier"]
        if v["op"] == "mul":
            assert c["target"] == r["target"]
        else:  # with or without "show your steps"
            assert c["target"] == f"{column_steps(v['op'], v['a'], v['b'])}\nAnswer: {c['answer']}"


def test_reasoning_steps_one_line_per_item():
    from quillan.data.generators import reasoning_steps

    assert reasoning_steps({"task": "max", "items": [3, 9, 4]}) == "3 3\n9 9\n4 9"
    assert reasoning_steps({"task": "min", "items": [7, 2, 5, 1]}) == "7 7\n2 2\n5 2\n1 1"
    assert reasoning_steps({"task": "count_even", "items": [12, 7, 4]}) == "12 y 1\n7 n 1\n4 y 2"
    assert reasoning_steps({"task": "count_gt", "items": [5, 9, 5, 11], "threshold": 5}) == "5 n 0\n9 y 1\n5 n 1\n11 y 2"
    assert reasoning_steps({"task": "next", "items": [2, 5, 8, 11], "rule": "arith"}) == "11-8=3\n11+3=14"
    assert reasoning_steps({"task": "next", "items": [3, 6, 12, 24], "rule": "geom"}) == "24/12=2\n24*2=48"
    # alt: 4, 50, 6, 48, 8 → the odd-place sequence 50, 48 continues with 46
    assert reasoning_steps({"task": "next", "items": [4, 50, 6, 48, 8], "rule": "alt"}) == "50-48=2\n48-2=46"
    assert reasoning_steps({"task": "sort", "items": [3, 1], "order": "asc"}) is None
    assert reasoning_steps({"task": "greater", "items": [3, 1]}) is None


def test_reasoning_steps_keep_prompts_and_answers_and_fit_the_decoding_budget():
    from quillan.data.generators import reasoning_steps

    plain = generate_tasks(600, 4, 0.3, ("reasoning",))
    steps = generate_tasks(600, 4, 0.3, ("reasoning",), reasoning_format="steps")
    with_steps = 0
    for p, s in pairs_with_same_prompts_and_answers(plain, steps):
        lines = reasoning_steps(s["verifier"])
        if lines is None:
            assert s["target"] == p["target"] == p["answer"]
        else:
            with_steps += 1
            assert s["target"] == f"{lines}\nAnswer: {s['answer']}"
            assert len(s["target"]) <= 96  # benchmark.eval_max_new_tokens at one byte per token
    assert with_steps > 600 * 4 / 7 * 0.9  # five of the seven families


def test_columns_mul_writes_one_digit_multipliers_in_columns_and_keeps_the_rest_of_columns():
    from quillan.data.generators import column_steps

    cols = generate_tasks(300, 3, 0.3, ("math",), "columns")
    mul = generate_tasks(300, 3, 0.3, ("math",), "columns_mul")
    in_columns = 0
    for c, m in pairs_with_same_prompts_and_answers(cols, mul):
        v = m["verifier"]
        if v["op"] == "mul" and v["b"] < 10:  # difficulties 1 and 2
            in_columns += 1
            assert m["target"] == f"{column_steps('mul', v['a'], v['b'])}\nAnswer: {m['answer']}"
        else:
            assert m["target"] == c["target"]
    assert in_columns > 300 / 3 * 2 / 3 * 0.8


def test_code_steps_keep_prompts_and_answers_and_trace_nested_expressions():
    from quillan.data.code_expr import evaluation_trace
    from quillan.data.generators import CODE_STEPS_MAX_CHARS

    plain = generate_tasks(900, 2, 0.3, ("code",))
    steps = generate_tasks(900, 2, 0.3, ("code",), code_format="steps")
    traced = 0
    for p, s in pairs_with_same_prompts_and_answers(plain, steps):
        trace = evaluation_trace(s["verifier"]["expr"])
        full = "\n".join([*trace, f"Answer: {s['answer']}"])
        if trace and len(full) <= CODE_STEPS_MAX_CHARS:
            traced += 1
            assert s["target"] == full
        else:  # a single operation, or a trace over the decoding budget
            assert s["target"] == p["target"] == p["answer"]
    assert 0.5 < traced / len(steps) < 0.9  # difficulty 1 is mostly single operations
