"""The feedback report on hand-made feedback: every number below is worked out by hand."""

from __future__ import annotations

import json

import pytest

from laffi_exp.core.records import Feedback, QAExample
from laffi_exp.feedback.report import cohen_kappa, feedback_report, numbers


def ex(i: int, *answers: str) -> QAExample:
    return QAExample(f"e{i}", "t", "a passage", f"question {i}?", answers)


EXAMPLES = [ex(1, "Paris"), ex(2, "Ann Lee", "Lee"), ex(3), ex(4, "1901"), ex(5, "Oslo"), ex(6, "blue"), ex(7, "7")]


def fb(
    i: int, prediction: str, text: str, source: str, annotator: str, verdict: str, correction: str | None
) -> Feedback:
    return Feedback(f"e{i}", f"question {i}?", prediction, text, source, annotator, verdict, correction)


FEEDBACK = [
    # EM 1: "correct" agrees.                                                     8 chars, 1 word
    fb(1, "Paris", "Correct.", "human", "alice", "correct", None),
    # EM 0, F1 2/3 (against "Lee"): agrees by EM, not by F1 >= 0.5; right fix.   35 chars, 6 words
    fb(2, "Bob Lee", 'Incorrect. The answer is "Ann Lee".', "human", "alice", "incorrect", "Ann Lee"),
    # Unanswerable: EM 0, F1 0; agrees; the fix "no answer" is right.             26 chars, 5 words
    fb(3, "Paris", "Wrong: there is no answer.", "human", "bob", "no_answer", ""),
    # EM 0, F1 0: "correct" disagrees.                                            19 chars, 4 words
    fb(4, "1902", "Yes, that is right.", "human", "bob", "correct", None),
    fb(5, "Oslo", "The model rambles.", "synthetic", "rule_based", "unknown", None),
    fb(6, "red", "Incorrect.", "synthetic", "rule_based", "incorrect", None),
    fb(7, "8", 'Incorrect. The answer is "9".', "synthetic", "rule_based", "incorrect", "9"),
]


def test_per_source_numbers():
    report = feedback_report(EXAMPLES, FEEDBACK)
    assert report["count"] == 7 and set(report["sources"]) == {"human", "synthetic"}
    human, synthetic = report["sources"]["human"], report["sources"]["synthetic"]

    assert human["count"] == 4 and human["verdicts"] == {"correct": 2, "incorrect": 1, "no_answer": 1, "unknown": 0}
    assert human["agreement_exact"] == 3 / 4 and human["agreement_f1"] == 2 / 4
    assert human["judged_correct"] == {"count": 2, "exact": 50.0, "f1": 50.0}
    assert human["judged_incorrect"]["count"] == 2 and human["judged_incorrect"]["exact"] == 0.0
    assert human["judged_incorrect"]["f1"] == pytest.approx(100 * (2 / 3) / 2)
    assert (human["correction_share"], human["correction_exact"], human["says_no_answer"]) == (1.0, 1.0, 1)
    assert human["chars"] == {"mean": 22.0, "median": 22.5, "min": 8, "max": 35}
    assert human["words"] == {"mean": 4.0, "median": 4.5, "min": 1, "max": 6}

    assert synthetic["verdicts"] == {"correct": 0, "incorrect": 2, "no_answer": 0, "unknown": 1}
    assert synthetic["agreement_exact"] == 1.0  # the unknown verdict is left out
    assert synthetic["judged_correct"] == {"count": 0, "exact": None, "f1": None}
    assert (synthetic["correction_share"], synthetic["correction_exact"]) == (0.5, 0.0)

    assert report["annotators"]["alice"]["agreement_exact"] == 1.0
    assert report["annotators"]["bob"]["agreement_exact"] == 0.5
    assert report["annotators"]["rule_based"]["count"] == 3
    assert "overlap" not in report
    json.dumps(report)  # it goes to feedback_report.json as it is


def test_human_synthetic_agreement_on_the_overlap():
    # All five predictions are right (EM 1). Human verdicts c c c i i, synthetic c c i i c:
    # agreement 3/5; chance 0.6 * 0.6 + 0.4 * 0.4 = 0.52; kappa (0.6 - 0.52) / (1 - 0.52) = 1/6.
    examples = [ex(i, f"answer {i}") for i in range(5)]
    human = ["correct", "correct", "correct", "incorrect", "incorrect"]
    synthetic = ["correct", "correct", "incorrect", "incorrect", "correct"]
    pairs = [
        (fb(i, f"answer {i}", "h", "human", "alice", h, None), fb(i, f"answer {i}", "s", "synthetic", "llm", s, None))
        for i, (h, s) in enumerate(zip(human, synthetic))
    ]
    overlap = feedback_report(examples, [h for h, _ in pairs], overlap=pairs)["overlap"]
    assert overlap["count"] == 5 and overlap["verdict_agreement"] == 3 / 5
    assert overlap["kappa"] == pytest.approx(1 / 6)
    assert overlap["human_agreement_exact"] == 3 / 5 and overlap["synthetic_agreement_exact"] == 3 / 5


def test_kappa_edge_cases():
    assert cohen_kappa(["correct", "incorrect"], ["correct", "incorrect"]) == 1.0
    assert cohen_kappa(["correct", "incorrect"], ["incorrect", "correct"]) == -1.0
    assert cohen_kappa(["correct"] * 3, ["correct"] * 3) is None  # chance agreement is 1
    assert cohen_kappa([], []) is None


def test_numbers_for_the_wandb_summary():
    flat = numbers(feedback_report(EXAMPLES, FEEDBACK))
    assert flat["feedback_report/sources/human/agreement_exact"] == 0.75
    assert flat["feedback_report/annotators/bob/chars/max"] == 26  # "Wrong: there is no answer."
    assert flat["feedback_report/sources/synthetic/verdicts/unknown"] == 1
    assert "feedback_report/sources/synthetic/judged_correct/exact" not in flat  # None is left out
    assert all(isinstance(v, (int, float)) for v in flat.values())


def test_feedback_on_unknown_examples_is_refused():
    with pytest.raises(ValueError, match="not among the examples: e9"):
        feedback_report(EXAMPLES, [fb(9, "x", "Correct.", "human", "alice", "correct", None)])


def test_human_human_agreement_per_pair_and_pooled():
    from laffi_exp.feedback.report import human_agreement

    ratings = [
        ("e1", "alice", "correct"),
        ("e1", "bob", "correct"),
        ("e1", "carol", "incorrect"),
        ("e2", "alice", "incorrect"),
        ("e2", "bob", "incorrect"),
        ("e3", "alice", "correct"),  # one annotator: not counted
    ]
    agreement = human_agreement(ratings)
    # Pairs: e1 alice|bob c c, alice|carol c i, bob|carol c i; e2 alice|bob i i. Pooled: 2 of 4 agree;
    # rater A c c c i, rater B c i i i: chance .75 * .25 + .25 * .75 = .375, kappa (.5 - .375) / .625 = .2
    assert (agreement["items"], agreement["count"], agreement["verdict_agreement"]) == (2, 4, 0.5)
    assert agreement["kappa"] == pytest.approx(0.2)
    assert agreement["pairs"]["alice|bob"] == {"count": 2, "verdict_agreement": 1.0, "kappa": 1.0}
    assert agreement["pairs"]["bob|carol"] == {"count": 1, "verdict_agreement": 0.0, "kappa": 0.0}  # chance 0
    assert human_agreement([("e1", "alice", "correct"), ("e2", "bob", "correct")]) is None


def test_annotation_time_per_item():
    from laffi_exp.feedback.report import annotation_time

    assert annotation_time([4.0, 10.0, 30.0, 6.0]) == {"count": 4, "total": 50.0, "median": 8.0, "mean": 12.5}
    assert annotation_time([]) == {"count": 0, "total": 0.0, "median": None, "mean": None}
