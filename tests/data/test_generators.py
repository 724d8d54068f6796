from collections import Counter

from quillan.data.generators import DOMAINS, generate_tasks


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
    from quillan.data.generators import generate_tasks
    from quillan.data.verify import extract_answer, verify_record

    plain = generate_tasks(90, 3, 0.3, ("math",))
    rev = generate_tasks(90, 3, 0.3, ("math",), "reversed")
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in rev]  # same items, other targets
    for p, r in zip(plain, rev):
        assert verify_record(r) and extract_answer(r["target"]) == r["answer"] == p["answer"]
        if "\n" not in p["target"]:  # plain answers become `rev <reversed digits>` + `Answer: N`
            assert r["target"] == f"rev {p['answer'][::-1]}\nAnswer: {p['answer']}"
        else:  # "show your steps" prompts keep their worked steps
            assert r["target"] == p["target"]
    neg = next(r for r in rev if r["answer"].startswith("-"))
    assert neg["target"].startswith(f"rev {neg['answer'][1:][::-1]}-\n")
