from quillan.data.filters import (apply_filters, has_refusal, jaccard, length_reason, near_duplicate_pairs,
                                  normalize_text, shingles, text_hash)
from quillan.data.generators import generate_tasks


def _rec(prompt, answer="4", target=None):
    return {"prompt": prompt, "answer": answer, "target": target or answer, "domain": "math", "difficulty": 1,
            "verifier": {"kind": "arith", "op": "add", "a": 2, "b": 2}}


def test_length_bounds():
    assert length_reason(_rec("2+2"), 4, 100) is None  # prompt 3 + target 1 = 4 chars
    assert length_reason(_rec("2+"), 4, 100) == "too_short"
    assert length_reason(_rec("x" * 100), 5, 100) == "too_long"
    assert length_reason(_rec("x" * 99), 5, 100) is None


def test_refusal_phrases():
    assert has_refusal("As an AI language model, I cannot help with that.")
    assert has_refusal("I'm sorry, but I can't assist.")
    assert has_refusal("i apologise for the confusion")
    assert not has_refusal("The answer is 42.")
    assert not has_refusal("Sort these: sorry, apple")  # the word alone is not a refusal


def test_exact_duplicate_normalisation():
    assert normalize_text("  What IS 2+2?  ") == "what is 2+2"
    assert text_hash("What is 2+2?") == text_hash("what   is 2+2")
    assert text_hash("What is 2+2?") != text_hash("What is 2+3?")


def test_near_duplicates_found_and_distinct_tasks_kept():
    a = "Please tell me the capital city of France and explain why it matters today"
    b = "Please tell me the capital city of France and explain why it matters today!!"  # punctuation only
    c = "Please tell me the capital city of France and explain why it matters a lot today"
    d = "What is 123 + 456?"
    e = "What is 123 + 457?"
    assert jaccard(shingles(a), shingles(c)) > 0.7
    dup = near_duplicate_pairs([a, b, c, d, e], threshold=0.7)
    assert dup == {1: 0, 2: 0}  # numbers stay whole tokens: d and e differ
    assert jaccard(shingles(d), shingles(e)) == 0.5


def test_apply_filters_counts_each_reason_and_keeps_good_records():
    good = [_rec("What is 2 + 2?")]
    rows = good + [
        _rec("What is 2 + 2?  "),                                   # exact duplicate
        _rec("What is 2 + 2?", target="As an AI, I think 4"),         # refusal (checked before dedup)
        _rec("x" * 500),                                             # too long
        dict(_rec("Add 2 and 2 please"), answer="5", target="5"),    # wrong answer
    ]
    kept, report = apply_filters(rows, min_chars=4, max_chars=300, near_dup_threshold=0.9)
    assert [r["prompt"] for r in kept] == ["What is 2 + 2?"]
    assert dict(report.dropped) == {"exact_duplicate": 1, "refusal": 1, "too_long": 1, "failed_verifier": 1}
    assert report.as_dict()["kept"] == 1


def test_generated_data_survives_filters_mostly():
    rows = generate_tasks(300, seed=1)
    kept, report = apply_filters(rows, min_chars=4, max_chars=400, near_dup_threshold=0.9)
    assert len(kept) >= 0.9 * len(rows)
    assert "failed_verifier" not in report.dropped
