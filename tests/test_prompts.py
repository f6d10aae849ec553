"""Prompt rendering, generation → answer post-processing, and reading feedback back."""

from __future__ import annotations

import pytest

from laffi_exp.annotate import RuleBasedAnnotator, SimulatedHuman
from laffi_exp.evaluate import reflected_answer
from laffi_exp.prompts import Prompter, parse_feedback
from laffi_exp.records import QAExample

EX = QAExample(id="a1", title="t", context="Ana Lo was born in 1901. Ana Lo married Ivo Ru.", question="Who did Ana Lo marry?", answers=("Ivo Ru",), answer_starts=(40,))
NOANS = QAExample(id="a2", title="t", context=EX.context, question="When did Ana Lo die?", answers=())


def test_prompts_follow_the_documented_template():
    p = Prompter()
    assert p.answer_prompt(EX) == f"Context: {EX.context}\nQuestion: {EX.question}\nAnswer:"
    assert p.answer_target("Ivo Ru") == " Ivo Ru" and p.answer_target("") == " unanswerable"
    assert p.feedback_prompt(EX, "").endswith("Answer: unanswerable\nFeedback:")
    assert p.feedback_prompt(EX, "1901").endswith("Answer: 1901\nFeedback:")


@pytest.mark.parametrize(
    ("generation", "answer"),
    [
        (" Ivo Ru", "Ivo Ru"),
        (" Ivo Ru\nQuestion: next", "Ivo Ru"),
        ("Answer: Ivo Ru", "Ivo Ru"),
        (' "Ivo Ru"', "Ivo Ru"),
        (" unanswerable", ""),
        (" Unanswerable.", ""),
        ("No answer", ""),
        ("", ""),
    ],
)
def test_generation_to_answer(generation, answer):
    assert Prompter().to_answer(generation) == answer


def test_no_answer_phrases_are_configurable():
    assert Prompter(no_answer_phrases=("dunno",)).to_answer(" dunno") == ""
    assert Prompter(no_answer_phrases=("dunno",)).to_answer(" unanswerable") == "unanswerable"


@pytest.mark.parametrize("seed", range(6))
def test_simulated_human_feedback_parses_to_its_judgement(seed):
    human = SimulatedHuman(seed=seed)
    cases = [(EX, "Ivo Ru", "correct", None), (EX, "1901", "incorrect", "Ivo Ru"), (EX, "", "incorrect", "Ivo Ru"),
             (NOANS, "", "correct", None), (NOANS, "1901", "no_answer", "")]
    for ex, pred, verdict, correction in cases:
        text = human.annotate(ex, pred)
        assert parse_feedback(text) == (verdict, correction), text


def test_rule_based_feedback_parses_and_errors_follow_the_rates():
    exact = RuleBasedAnnotator(wrong_verdict_rate=0.0, missing_correction_rate=0.0)
    assert parse_feedback(exact.annotate(EX, "1901")) == ("incorrect", "Ivo Ru")
    assert parse_feedback(exact.annotate(EX, "Ivo Ru")) == ("correct", None)
    assert parse_feedback(exact.annotate(NOANS, "1901")) == ("no_answer", "")
    always_wrong = RuleBasedAnnotator(wrong_verdict_rate=1.0)
    assert parse_feedback(always_wrong.annotate(EX, "Ivo Ru"))[0] == "incorrect"
    assert parse_feedback(always_wrong.annotate(EX, "1901"))[0] == "correct"
    no_fix = RuleBasedAnnotator(wrong_verdict_rate=0.0, missing_correction_rate=1.0)
    assert parse_feedback(no_fix.annotate(EX, "1901")) == ("incorrect", None)
    with pytest.raises(ValueError, match="wrong_verdict_rate"):
        RuleBasedAnnotator(wrong_verdict_rate=2.0)


def test_parse_feedback_of_free_text():
    assert parse_feedback("The model rambles.") == ("unknown", None)
    assert parse_feedback('Wrong. The answer should be "Oslo".') == ("incorrect", "Oslo")
    assert parse_feedback("Incorrect.") == ("incorrect", None)


def test_reflect_rule():
    assert reflected_answer("1901", "incorrect", "Ivo Ru") == "Ivo Ru"
    assert reflected_answer("1901", "no_answer", "") == ""
    assert reflected_answer("1901", "incorrect", None) == "1901"
    assert reflected_answer("1901", "correct", None) == "1901"
    assert reflected_answer("1901", "unknown", "x") == "1901"
