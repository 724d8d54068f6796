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
