"""The embedded dataset and SQuAD-layout reading: layout, determinism, split hygiene, schema errors."""

from __future__ import annotations

import json

import pytest

from laffi_exp.data.squad import SquadJSON, examples_from_squad, load_squad_file
from laffi_exp.data.synthetic import MAIN_QUESTIONS, POOL_QUESTIONS, SyntheticQA, generate
from laffi_exp.errors import ConfigError

from .conftest import SQUAD_DEV, needs


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


def _tiny_squad():
    return {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
                            {"id": "q2", "question": "Who?", "answers": [], "is_impossible": True},
                        ],
                    }
                ],
            }
        ]
    }


def test_examples_from_squad_reads_answers_and_squad_v1_files():
    exs = examples_from_squad(_tiny_squad())
    assert [e.id for e in exs] == ["q1", "q2"]
    assert exs[0].answers == ("France",) and not exs[0].is_impossible
    assert exs[1].is_impossible and exs[1].gold == ""


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id="q1"), "duplicate question id 'q1'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=3), "answer_start 3"),
        (lambda d: d["data"][0]["paragraphs"][0].pop("qas"), "no 'qas'"),
        (lambda d: d["data"][0]["paragraphs"][0].pop("context"), "no 'context'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("id"), "no 'id'"),
        (lambda d: d.pop("data"), "'data' list"),
    ],
)
def test_malformed_squad_is_a_clear_error(mutate, needle):
    data = _tiny_squad()
    mutate(data)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        examples_from_squad(data, source="bad.json")


def test_missing_and_invalid_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: file not found"):
        load_squad_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_squad_file(bad)
    with pytest.raises(ConfigError, match="dataset.path"):
        SquadJSON(path=str(tmp_path / "nope.json")).check()


@needs(SQUAD_DEV)
def test_squad_json_splits_by_article_deterministically():
    ds = SquadJSON(path=str(SQUAD_DEV), seed=1, num_train=40, num_val=10, num_eval=30)
    splits = ds.splits()
    assert {k: len(_qas(v)) for k, v in splits.items()} == {"train": 40, "validation": 10, "test": 30}
    titles = {k: {a["title"] for a in v["data"]} for k, v in splits.items()}
    assert not titles["train"] & titles["test"] and not titles["validation"] & titles["test"]
    assert json.dumps(ds.splits()) == json.dumps(splits)
