"""Prompt rendering, generation → answer post-processing, and reading feedback back."""

from __future__ import annotations

import pytest

from laffi_exp.core.prompts import Prompter, parse_feedback
from laffi_exp.core.records import QAExample
from laffi_exp.feedback.simulated import RuleBasedAnnotator, SimulatedHuman
from laffi_exp.stages.evaluate import reflected_answer

EX = QAExample(
    id="a1",
    title="t",
    context="Ana Lo was born in 1901. Ana Lo married Ivo Ru.",
    question="Who did Ana Lo marry?",
    answers=("Ivo Ru",),
    answer_starts=(40,),
)
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
    cases = [
        (EX, "Ivo Ru", "correct", None),
        (EX, "1901", "incorrect", "Ivo Ru"),
        (EX, "", "incorrect", "Ivo Ru"),
        (NOANS, "", "correct", None),
        (NOANS, "1901", "no_answer", ""),
    ]
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


def _train(n: int) -> list[QAExample]:
    return [
        QAExample(
            f"t{i}", "t", "Word " * (5 + i % 17) + f"fact {i}.", f"What is fact {i}?", (f"fact {i}",) if i % 3 else ()
        )
        for i in range(n)
    ]


def test_shots_come_from_the_given_split_half_unanswerable_and_only_in_answer_prompts():
    train = _train(100)
    p, ids = Prompter(shots=4, instruction="Answer briefly.\n\n").with_shots(train)
    chosen = {ex.id: ex for ex in train if ex.id in ids}
    assert len(ids) == 4 and set(ids) <= {ex.id for ex in train}
    assert sum(not ex.answers for ex in chosen.values()) == 2
    prompt = p.answer_prompt(EX)
    assert prompt.startswith("Answer briefly.\n\nContext: ") and prompt.endswith(Prompter().answer_prompt(EX))
    for ex in chosen.values():  # each shot: its answer prompt, its answer (or the no-answer text), a blank line
        assert Prompter().answer_prompt(ex) + Prompter().answer_target(ex.gold) + "\n\n" in prompt
    assert p.feedback_prompt(EX, "x") == Prompter().feedback_prompt(EX, "x")  # no instruction, no shots
    assert p.longest_prompt(EX) == prompt  # what must fit the window
    # deterministic, fixed by shot_seed (not by the order of the split), another seed draws others
    assert Prompter(shots=4).with_shots(list(reversed(train)))[1] == Prompter(shots=4).with_shots(train)[1]
    assert Prompter(shots=4, shot_seed=1).with_shots(train)[1] != ids
    assert Prompter().with_shots(train) == (Prompter(), [])


def test_windowing_counts_the_shots(tmp_path):
    from laffi_exp.data.window import fit_contexts

    class Chars:  # a tokenizer of one token per character
        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            out = {"input_ids": list(range(len(text)))}
            if return_offsets_mapping:
                out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
            return out

    long = QAExample("l", "t", "x" * 300, "What?", ())
    _plain, n_plain = fit_contexts([long], Chars(), Prompter(), 400, around_answer=False)
    fewshot = Prompter(shots=2).with_shots(_train(50))[0]
    shortened, n_short = fit_contexts([long], Chars(), fewshot, 400, around_answer=False)
    assert (n_plain, n_short) == (0, 1) and len(fewshot.answer_prompt(shortened[0])) <= 400
