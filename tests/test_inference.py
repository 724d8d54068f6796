"""quillan.inference: exact-match accuracy per family and difficulty, the prior baseline, intervals."""

import math
import pytest

import torch

from quillan.config import QuillanConfig
from quillan.data.tokenizer import train_tokenizer, training_text
from quillan.inference import (accuracy_by_domain, majority_answer, prior_baseline, prior_pass_at_k, task_of,
                                wilson_interval)
from quillan.model import Quillan


def _rec(task, answer, difficulty=1, domain="reasoning"):
    return {"domain": domain, "task": task, "difficulty": difficulty, "prompt": f"{task}?", "answer": answer,
            "target": answer}


def test_prior_baseline_answers_each_familys_most_frequent_training_answer():
    train = [_rec("count", "1")] * 5 + [_rec("count", "2")] * 3 + [_rec("greater", "no")] * 2 + [_rec("greater", "yes")] * 2
    test = [_rec("count", "1"), _rec("count", "1"), _rec("count", "3"), _rec("count", "2"),
            _rec("greater", "no"), _rec("greater", "yes"), _rec("sort", "1, 2")]
    prior = prior_baseline(train, test)
    assert prior["reasoning/count"] == 0.5           # "1" is the mode: right on 2 of 4
    assert prior["reasoning/greater"] == 0.5         # a tie: "no" < "yes", right on 1 of 2
    assert prior["reasoning/sort"] == 0.0            # never seen in training: no guess
    assert math.isclose(prior["overall"], 3 / 7)


def test_prior_pass_at_k_is_the_chance_that_k_guesses_from_the_training_answers_hit():
    train = [_rec("count", "1")] * 6 + [_rec("count", "2")] * 2 + [_rec("greater", "yes")] * 4
    test = [_rec("count", "1"), _rec("count", "2"), _rec("count", "7"), _rec("greater", "yes "), _rec("sort", "1")]
    got = prior_pass_at_k(train, test, k=2)
    # p("1") = 3/4: 1 − (1/4)² = 15/16; p("2") = 1/4: 1 − (3/4)² = 7/16; "7" never seen: 0
    assert math.isclose(got["by_task"]["reasoning/count"], (15 / 16 + 7 / 16 + 0) / 3)
    assert got["by_task"]["reasoning/greater"] == 1.0   # answers compare normalised, as the verifier does
    assert got["by_task"]["reasoning/sort"] == 0.0      # a family training never had
    assert math.isclose(got["pass_at_k"], (15 / 16 + 7 / 16 + 1.0) / 5)
    assert prior_pass_at_k(train, test, k=1)["by_task"]["reasoning/count"] == (3 / 4 + 1 / 4) / 3


def test_majority_answer_votes_over_the_extracted_answers():
    assert majority_answer(["Answer: 3", "2", "steps\nAnswer: 2 ", "x\nAnswer: 3", "Answer: 3."]) == "3"
    assert majority_answer(["5", "Answer: 4", "4", "5"]) == "5"     # a tie: the answer given first
    assert majority_answer([]) == ""


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson_interval(600, 1000)
    assert abs(lo - 0.5693) < 1e-3 and abs(hi - 0.6299) < 1e-3  # ±3.0 points at 60 % on 1,000 records
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0.06 < hi < 0.08


def test_accuracy_by_domain_counts_every_family_and_difficulty():
    recs = [_rec("max", "9", 1), _rec("max", "7", 2), _rec("upper", "AB", 3, "writing")]
    tok = train_tokenizer((training_text(r) for r in recs * 20), vocab_size=300)
    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke", vocab_size=tok.get_vocab_size())).eval()
    acc = accuracy_by_domain(model, tok, recs, max_new_tokens=4)
    assert acc["count"] == 3 and acc["task_counts"] == {"reasoning/max": 2, "writing/upper": 1}
    assert set(acc["by_difficulty"]) == {"1", "2", "3"} and set(acc["by_task"]) == {task_of(r) for r in recs}
    assert acc["interval95"][0] <= acc["accuracy"] <= acc["interval95"][1]
    # Per-record outcomes in the order given (evaluation sorts by prompt length internally): a
    # record whose answer is what the model writes scores 1 wherever it stands.
    from quillan.data.tokenizer import prompt_text
    from quillan.data.verify import extract_answer
    from quillan.inference import complete

    written = extract_answer(complete(model, tok, [prompt_text(recs[2])], 4)[0])
    mixed = [recs[0], {**recs[2], "answer": written}, recs[1]]
    got = accuracy_by_domain(model, tok, mixed, max_new_tokens=4)
    assert got["outcomes"][1] == 1 and sum(got["outcomes"]) == got["correct"] and len(got["outcomes"]) == 3


def test_pass_at_k_counts_prompts_with_any_correct_sample():
    """A record answered with what the model writes greedily: at a near-zero temperature every
    sample is the greedy one (pass@1 = pass@k = 1 for it, 0 for a record no sample matches); at a
    high temperature samples differ, pass@k ≥ pass@1, and a seed fixes them."""
    from quillan.data.tokenizer import prompt_text
    from quillan.data.verify import extract_answer
    from quillan.inference import complete, pass_at_k

    recs = [_rec("max", "9", 1), _rec("upper", "AB", 3, "writing")]
    tok = train_tokenizer((training_text(r) for r in recs * 20), vocab_size=300)
    torch.manual_seed(0)
    model = Quillan(QuillanConfig.preset("smoke", vocab_size=tok.get_vocab_size())).eval()
    written = extract_answer(complete(model, tok, [prompt_text(recs[0])], 4)[0])
    recs = [{**recs[0], "answer": written}, {**recs[1], "answer": "never written"}]
    cold = pass_at_k(model, tok, recs, k=4, temperature=1e-4, max_new_tokens=4)
    assert cold["by_task"]["reasoning/max"] == {"pass_at_1": 1.0, "pass_at_k": 1.0, "maj_at_k": 1.0, "n": 1}
    assert cold["by_task"]["writing/upper"] == {"pass_at_1": 0.0, "pass_at_k": 0.0, "maj_at_k": 0.0, "n": 1}
    assert cold["pass_at_1"] == cold["pass_at_k"] == cold["maj_at_k"] == 0.5 and cold["k"] == 4
    hot = pass_at_k(model, tok, recs, k=8, temperature=5.0, max_new_tokens=4, seed=3)
    assert hot["pass_at_k"] >= hot["pass_at_1"] and 0.0 <= hot["by_task"]["reasoning/max"]["pass_at_1"] < 1.0
    assert hot["maj_at_k"] <= hot["pass_at_k"]  # a right majority needs a right sample
    assert hot == pass_at_k(model, tok, recs, k=8, temperature=5.0, max_new_tokens=4, seed=3)


def test_paired_standard_error_counts_only_records_that_changed():
    from quillan.inference import paired_standard_error

    # 512 records: 30 lost, 18 gained, the rest unchanged: d has mean -12/512 and sample
    # variance (48 − 512·(12/512)²) / 511; its standard error sqrt(var / 512) ≈ 0.0136.
    before = [1] * 30 + [0] * 18 + [1] * 100 + [0] * 364
    after = [0] * 30 + [1] * 18 + [1] * 100 + [0] * 364
    assert paired_standard_error(before, after) == pytest.approx(math.sqrt((48 - 12**2 / 512) / 511 / 512))
    assert paired_standard_error(before, before) == 0.0 and paired_standard_error([1], [0]) == 0.0
    with pytest.raises(ValueError, match="not the same records"):
        paired_standard_error(before, after[:-1])
