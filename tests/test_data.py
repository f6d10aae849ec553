"""The embedded dataset: layout, determinism, split hygiene (SQuAD-file reading: test_squad_data.py)."""

from __future__ import annotations

import json

import pytest

from laffi_exp.data.squad_format import examples_from_squad
from laffi_exp.data.synthetic import MAIN_QUESTIONS, POOL_QUESTIONS, SyntheticQA, generate


def _qas(squad):
    return [(p["context"], qa) for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]]


def test_generated_data_is_valid_squad_v2_with_a_third_unanswerable():
    squad = generate(7, "train", 900)
    qas = _qas(squad)
    assert len(qas) == 900
    for context, qa in qas:
        assert qa["is_impossible"] == (qa["answers"] == [])
        for ans in qa["answers"] + qa.get("plausible_answers", []):
            assert context[ans["answer_start"] : ans["answer_start"] + len(ans["text"])] == ans["text"]
    share = sum(qa["is_impossible"] for _, qa in qas) / len(qas)
    assert 0.25 < share < 0.42
    # the unanswerable questions are hard: most have a plausible span of the right type in the passage
    hard = [qa for _, qa in qas if qa["is_impossible"]]
    assert sum(bool(qa["plausible_answers"]) for qa in hard) / len(hard) > 0.6
    assert len(examples_from_squad(squad)) == 900


def test_generation_is_deterministic_and_splits_are_disjoint():
    assert json.dumps(generate(3, "test", 50)) == json.dumps(generate(3, "test", 50))
    assert json.dumps(generate(3, "test", 50)) != json.dumps(generate(4, "test", 50))
    splits = SyntheticQA(seed=3, num_train=200, num_val=50, num_eval=100).splits()
    contexts = {k: {c for c, _ in _qas(v)} for k, v in splits.items()}
    ids = {k: {qa["id"] for _, qa in _qas(v)} for k, v in splits.items()}
    pool = generate(3, "pool", 300)
    contexts["pool"], ids["pool"] = {c for c, _ in _qas(pool)}, {qa["id"] for _, qa in _qas(pool)}
    names = list(contexts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not contexts[a] & contexts[b], (a, b)
            assert not ids[a] & ids[b], (a, b)


def test_pool_comes_from_a_different_question_distribution():
    pool_q = {t for ts in POOL_QUESTIONS.values() for t in ts}
    main_q = {t for ts in MAIN_QUESTIONS.values() for t in ts}
    assert not pool_q & main_q
    pool = _qas(generate(0, "pool", 600))
    impossible = [qa for _, qa in pool if qa["is_impossible"]]
    assert 0 < len(impossible) / len(pool) < 0.2
    assert all(qa["plausible_answers"] == [] for qa in impossible)  # only easy unanswerables


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        generate(0, "dev", 10)
