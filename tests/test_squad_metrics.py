"""SQuAD 2.0 scorer: normalisation, EM/F1, splits, missing ids, no-answer thresholds, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from laffi_exp.score import main
from laffi_exp.scoring.squad_metrics import (
    compute_exact,
    compute_f1,
    evaluate,
    golds_from_dataset,
    missing_ids,
    normalize_answer,
    score_examples,
)

REPO = Path(__file__).resolve().parents[1]
DEV_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad_v2" / "dev-v2.0.json"


def squad_data(golds: dict[str, list[str]]) -> list[dict]:
    """A SQuAD ``data`` list with one question per gold entry, split over two articles."""
    qas = [
        {
            "id": qid,
            "question": "?",
            "answers": [{"text": t, "answer_start": 0} for t in answers],
            "is_impossible": not answers,
        }
        for qid, answers in golds.items()
    ]
    half = len(qas) // 2
    return [
        {"title": "A", "paragraphs": [{"context": "c", "qas": qas[:half]}]},
        {"title": "B", "paragraphs": [{"context": "c", "qas": qas[half:]}]},
    ]


# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Denver Broncos", "denver broncos"),  # case and a leading article
        ("a An THE", ""),  # only articles
        ("an apple a day", "apple day"),
        ("theory other Athena banana", "theory other athena banana"),  # "the"/"a"/"an" inside words stay
        ("Hello, World!", "hello world"),
        ("  lots \t of\n\nspace  ", "lots of space"),
        ("the-end", "theend"),  # punctuation goes first, so no article is left to remove
        ("(the) cat", "cat"),
        ("U.S.A.", "usa"),
        ("“Quoted” café", "“quoted” café"),  # non-ASCII punctuation is not in string.punctuation
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# --- exact match and F1 -------------------------------------------------------------------------


def test_exact_match_ignores_case_punctuation_articles():
    assert compute_exact("The Broncos", "broncos.") == 1
    assert compute_exact("Denver Broncos", "Broncos") == 0


def test_f1_partial_overlap_worked_example():
    # pred tokens [denver, broncos, team, in, colorado] (5), gold [denver, broncos] (2), common 2:
    # precision 2/5, recall 2/2, F1 = 2 * 0.4 * 1 / 1.4 = 4/7.
    assert compute_f1("Denver Broncos", "the Denver Broncos team in Colorado") == pytest.approx(4 / 7)
    # Repeated tokens count at most as often as in both: gold [new, york, new, york], pred [new, york]:
    # common 2, precision 1, recall 1/2, F1 = 2/3.
    assert compute_f1("New York, New York", "new york") == pytest.approx(2 / 3)
    assert compute_f1("Denver", "Carolina Panthers") == 0.0


def test_f1_when_a_side_has_no_tokens():
    assert compute_f1("", "") == 1.0
    assert compute_f1("", "Paris") == 0.0
    assert compute_f1("Paris", "") == 0.0
    assert compute_f1("The", "...") == 1.0  # both normalise to nothing


def test_several_gold_answers_take_the_max():
    golds = {"q": ["Denver Broncos", "Broncos team"]}
    # vs "Denver Broncos": precision 1, recall 1/2 -> 2/3; vs "Broncos team": no overlap -> 0.
    result = score_examples(golds, {"q": "Denver"})
    assert result["exact"] == 0.0
    assert result["f1"] == pytest.approx(100 * 2 / 3)
    assert score_examples({"q": ["Denver Broncos", "the Broncos"]}, {"q": "broncos"})["exact"] == 100.0


def test_empty_and_non_empty_predictions_on_answerable_and_unanswerable():
    assert score_examples({"q": []}, {"q": ""})["exact"] == 100.0  # right "no answer"
    assert score_examples({"q": []}, {"q": ""})["f1"] == 100.0
    assert score_examples({"q": ["Paris"]}, {"q": ""})["exact"] == 0.0  # missed answer
    assert score_examples({"q": ["Paris"]}, {"q": ""})["f1"] == 0.0
    assert score_examples({"q": []}, {"q": "Paris"})["exact"] == 0.0  # answered the unanswerable
    assert score_examples({"q": []}, {"q": "Paris"})["f1"] == 0.0


def test_gold_that_normalises_to_nothing_is_scored_as_no_answer_but_stays_hasans():
    result = score_examples({"q": ["The"]}, {"q": ""})
    assert result["exact"] == 100.0
    assert result["HasAns_total"] == 1
    assert "NoAns_total" not in result


# --- splits, totals, missing ids ----------------------------------------------------------------

SPLIT_GOLDS = {"q1": ["Paris"], "q2": [], "q3": ["1990s", "the 1990s"], "q4": []}
SPLIT_PREDS = {"q1": "Paris", "q2": "", "q3": "the late 1990s", "q4": "London"}


def test_hasans_noans_split():
    # q1 right (1, 1); q2 right no-answer (1, 1); q3 "late 1990s" vs "1990s": EM 0, F1 2*(1/2)*1/(3/2) = 2/3;
    # q4 answered an unanswerable one (0, 0).
    result = score_examples(SPLIT_GOLDS, SPLIT_PREDS)
    assert list(result) == [
        "exact",
        "f1",
        "total",
        "HasAns_exact",
        "HasAns_f1",
        "HasAns_total",
        "NoAns_exact",
        "NoAns_f1",
        "NoAns_total",
    ]
    assert result["exact"] == 50.0
    assert result["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3 + 0) / 4)
    assert result["total"] == 4
    assert result["HasAns_exact"] == 50.0
    assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result["HasAns_total"] == 2
    assert (result["NoAns_exact"], result["NoAns_f1"], result["NoAns_total"]) == (50.0, 50.0, 2)


def test_split_keys_only_for_non_empty_splits():
    assert list(score_examples({"a": ["x"], "b": ["y"]}, {"a": "x", "b": "z"})) == [
        "exact",
        "f1",
        "total",
        "HasAns_exact",
        "HasAns_f1",
        "HasAns_total",
    ]
    assert list(score_examples({"a": []}, {"a": ""})) == [
        "exact",
        "f1",
        "total",
        "NoAns_exact",
        "NoAns_f1",
        "NoAns_total",
    ]


def test_evaluate_on_squad_json_agrees_with_score_examples():
    data = squad_data(SPLIT_GOLDS)
    assert golds_from_dataset(data) == SPLIT_GOLDS
    assert evaluate(data, SPLIT_PREDS) == score_examples(SPLIT_GOLDS, SPLIT_PREDS)
    na = {"q1": 0.2, "q2": 0.9, "q3": 0.4, "q4": 0.7}
    assert evaluate(data, SPLIT_PREDS, na, 0.5) == score_examples(SPLIT_GOLDS, SPLIT_PREDS, na, 0.5)


def test_missing_predictions_are_wrong_counted_and_listed():
    golds = {"q1": ["Paris"], "q2": [], "q3": ["Rome"]}
    preds = {"q1": "Paris", "extra": "ignored"}
    result = score_examples(golds, preds)
    # q1 right; q2 and q3 missing score 0 (even the unanswerable one) and stay in the totals.
    assert result["exact"] == pytest.approx(100 / 3)
    assert result["total"] == 3
    assert (result["HasAns_exact"], result["HasAns_total"]) == (50.0, 2)
    assert (result["NoAns_exact"], result["NoAns_total"]) == (0.0, 1)
    assert missing_ids(squad_data(golds), preds) == ["q2", "q3"]
    assert evaluate(squad_data(golds), preds) == result


# --- no-answer probabilities --------------------------------------------------------------------

# a: right answer; b: answers an unanswerable one; c: partly right (F1 0.8, EM 0); d: right "no answer".
NA_GOLDS = {"a": ["x"], "b": [], "c": ["big red apple"], "d": []}
NA_PREDS = {"a": "x", "b": "z", "c": "red apple", "d": ""}
NA_PROBS = {"a": 0.1, "b": 0.9, "c": 0.6, "d": 0.3}


def test_na_prob_threshold():
    # Without a threshold: EM (1+0+0+1)/4 = 50, F1 (1+0+0.8+1)/4 = 70.
    plain = score_examples(NA_GOLDS, NA_PREDS)
    assert (plain["exact"], plain["f1"]) == (50.0, pytest.approx(70.0))
    # Threshold 0.5: b (0.9) and c (0.6) become "no answer": b right (1.0), c wrong (0.0).
    result = score_examples(NA_GOLDS, NA_PREDS, NA_PROBS, na_prob_thresh=0.5)
    assert (result["exact"], result["f1"]) == (75.0, 75.0)
    assert (result["HasAns_exact"], result["NoAns_exact"]) == (50.0, 100.0)
    # The default threshold 1.0 changes nothing, but the best_* keys appear.
    default = score_examples(NA_GOLDS, NA_PREDS, NA_PROBS)
    assert (default["exact"], default["f1"]) == (50.0, pytest.approx(70.0))


def test_best_thresholds_worked_example():
    # Start with every prediction replaced by no-answer: right on b and d -> 2. Keep predictions in
    # increasing probability a (0.1), d (0.3), c (0.6), b (0.9):
    #   EM: 2 -> a +1 = 3 (best, 0.1) -> d +0 = 3 -> c +0 = 3 -> b -1 = 2. best 3/4 at 0.1.
    #   F1: 2 -> a +1 = 3 (0.1) -> d +0 = 3 -> c +0.8 = 3.8 (best, 0.6) -> b -1 = 2.8. best 3.8/4 at 0.6.
    result = score_examples(NA_GOLDS, NA_PREDS, NA_PROBS)
    assert list(result)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    assert (result["best_exact"], result["best_exact_thresh"]) == (75.0, 0.1)
    assert result["best_f1"] == pytest.approx(95.0)
    assert result["best_f1_thresh"] == 0.6
    assert "best_exact" not in score_examples(NA_GOLDS, NA_PREDS)


def test_best_threshold_keeps_the_first_of_equal_scores():
    # 1 (b) -> a +1 = 2 (best, 0.1) -> b -1 = 1 -> c +1 = 2, not better: the threshold stays 0.1.
    golds = {"a": ["x"], "b": [], "c": ["y"]}
    result = score_examples(golds, {"a": "x", "b": "junk", "c": "y"}, {"a": 0.1, "b": 0.2, "c": 0.3})
    assert result["best_exact"] == pytest.approx(200 / 3)
    assert result["best_exact_thresh"] == 0.1


def test_best_threshold_ties_follow_na_prob_order_like_the_official_stable_sort():
    golds = {"p": [], "q": ["x"]}
    preds = {"p": "junk", "q": "x"}
    # p first: 1 -> p -1 = 0 -> q +1 = 1, never better than the start: 50.0 at the initial 0.0.
    first = score_examples(golds, preds, {"p": 0.5, "q": 0.5})
    assert (first["best_exact"], first["best_exact_thresh"]) == (50.0, 0.0)
    # q first: 1 -> q +1 = 2 (best, 0.5) -> p -1 = 1.
    second = score_examples(golds, preds, {"q": 0.5, "p": 0.5})
    assert (second["best_exact"], second["best_exact_thresh"]) == (100.0, 0.5)


def test_missing_na_prob_is_an_error():
    with pytest.raises(ValueError, match="no-answer probability missing"):
        score_examples({"q": ["x"]}, {"q": "x"}, {})


# --- CLI ----------------------------------------------------------------------------------------


def write(path: Path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path):
    golds = {"q1": ["Paris"], "q2": []}
    return {
        "data": write(tmp_path / "data.json", {"version": "v2.0", "data": squad_data(golds)}),
        "preds": write(tmp_path / "preds.json", {"q1": "paris", "q2": "x"}),
        "na": write(tmp_path / "na.json", {"q1": 0.2, "q2": 0.7}),
        "dir": tmp_path,
    }


def test_cli_prints_official_json(files, capsys):
    assert main([files["data"], files["preds"]]) == 0
    out, err = capsys.readouterr()
    assert out == (
        "{\n"
        '  "exact": 50.0,\n  "f1": 50.0,\n  "total": 2,\n'
        '  "HasAns_exact": 100.0,\n  "HasAns_f1": 100.0,\n  "HasAns_total": 1,\n'
        '  "NoAns_exact": 0.0,\n  "NoAns_f1": 0.0,\n  "NoAns_total": 1\n'
        "}\n"
    )
    assert err == ""


def test_cli_na_probs_and_out_file(files, capsys):
    out_file = files["dir"] / "sub" / "eval.json"
    argv = [
        files["data"],
        files["preds"],
        "--na-prob-file",
        files["na"],
        "--na-prob-thresh",
        "0.5",
        "--out-file",
        str(out_file),
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    expected = evaluate(
        json.loads(Path(files["data"]).read_text())["data"], {"q1": "paris", "q2": "x"}, {"q1": 0.2, "q2": 0.7}, 0.5
    )
    assert expected["exact"] == 100.0  # q2 (0.7 > 0.5) becomes a right "no answer"
    assert out_file.read_text() == json.dumps(expected)  # compact, no newline, like json.dump


def test_cli_reports_missing_ids_on_stderr_without_changing_numbers(files, capsys):
    preds = write(files["dir"] / "partial.json", {"q1": "Paris"})
    assert main([files["data"], preds]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["exact"] == 50.0  # q1 right, q2 missing counts as wrong
    assert json.loads(out)["total"] == 2
    assert "1 of 2 questions have no prediction" in err and "q2" in err


@pytest.mark.parametrize(
    ("which", "content", "expected"),
    [
        ("data", None, "file not found"),
        ("preds", None, "file not found"),
        ("preds", "{not json", "not valid JSON"),
        ("preds", "[1, 2]", "expected a JSON object mapping"),
        ("preds", '{"q1": 3}', "value for 'q1' is int"),
        ("data", '{"version": "v2.0"}', "no 'data' key"),
        ("data", '{"data": [{"title": "x"}]}', "'paragraphs' list"),
        ("na", '{"q1": "high"}', "no-answer probability"),
        ("na", '{"q1": 0.5}', "no-answer probability missing"),
    ],
)
def test_cli_bad_input(files, capsys, which, content, expected):
    path = files["dir"] / f"bad_{which}.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    paths = {"data": files["data"], "preds": files["preds"], which: str(path)}
    argv = [paths["data"], paths["preds"]] + (["--na-prob-file", paths["na"]] if "na" in paths else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and str(path) in err and expected in err
    assert "Traceback" not in err


def test_cli_runs_as_module(files):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ok = subprocess.run(
        [sys.executable, "-m", "laffi_exp.score", files["data"], files["preds"]],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["total"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "laffi_exp.score", files["data"], str(files["dir"] / "nope.json")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "nope.json" in bad.stderr and "Traceback" not in bad.stderr


# --- the real dev set, when present -------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_data():
    if not DEV_FILE.exists():
        pytest.skip(f"SQuAD 2.0 dev set not found at {DEV_FILE}")
    return json.loads(DEV_FILE.read_text(encoding="utf-8"))["data"]


def test_dev_all_empty_predictions(dev_data):
    golds = golds_from_dataset(dev_data)
    result = evaluate(dev_data, dict.fromkeys(golds, ""))
    # Exactly the share of unanswerable questions, 5945 / 11873, as the official script prints it.
    assert result["exact"] == result["f1"] == 50.07159100480081 == 100.0 * 5945 / 11873
    assert (result["total"], result["HasAns_total"], result["NoAns_total"]) == (11873, 5928, 5945)
    assert (result["HasAns_exact"], result["NoAns_exact"]) == (0.0, 100.0)


def test_dev_first_gold_answer_is_perfect(dev_data):
    golds = golds_from_dataset(dev_data)
    result = evaluate(dev_data, {qid: answers[0] if answers else "" for qid, answers in golds.items()})
    assert result["exact"] == result["f1"] == 100.0
    assert missing_ids(dev_data, {}) == list(golds)
