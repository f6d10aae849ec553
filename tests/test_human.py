"""Human feedback through files: a filled-in file becomes the human pool, every bad input is refused
with the ids and the file named, and an exported batch comes back through the importer."""

from __future__ import annotations

import csv
import json

import pytest

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.records import Answer, QAExample
from laffi_exp.feedback.human import HumanFileAnnotator, export_batch
from laffi_exp.feedback.hybrid import annotate, human_ids
from laffi_exp.feedback.simulated import RuleBasedAnnotator

RATIO, SEED = 0.5, 3


def _example(i: int) -> QAExample:
    context = f"Passage {i} names Ann{i}, a painter.\nIt goes on, on a second line."
    answers = (f"Ann{i}",) if i % 4 else ()
    return QAExample(f"q{i}", "t", context, f"Who is the painter of passage {i}?", answers, (15,) if answers else ())


EXAMPLES = [_example(i) for i in range(40)]
# Odd: the right answer (which is "" when unanswerable); even: "Bob", or no answer every sixth.
PREDICTIONS = {ex.id: ex.gold if i % 2 else ("" if i % 6 == 0 else "Bob") for i, ex in enumerate(EXAMPLES)}
ANSWERS = [Answer(ex.id, ex.question, PREDICTIONS[ex.id], "") for ex in EXAMPLES]
CHOSEN = human_ids([ex.id for ex in EXAMPLES], RATIO, SEED)


def human_rows() -> list[dict]:
    """What careful annotators write for the chosen ids, in several shapes a file can take."""
    rows = []
    for i, ex in enumerate(EXAMPLES):
        if ex.id not in CHOSEN:
            continue
        prediction = PREDICTIONS[ex.id]
        if prediction == "":
            shown = "unanswerable" if i % 4 == 0 else ""  # both ways of writing no answer
        else:
            shown = f"  {prediction} "  # stray whitespace is not a different answer
        if prediction == ex.gold:
            text = f"Correct, passage {i}\nsays so."
        else:
            text = f'Incorrect. The answer is "{ex.gold}".' if ex.answers else "Wrong: the question cannot be answered."
        rows.append({"id": ex.id, "prediction": shown, "feedback": text, "annotator_id": "alice" if i % 3 == 0 else ""})
    return rows


def write(path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(params=["jsonl", "csv"])
def human_file(request, tmp_path):
    path = tmp_path / f"human.{request.param}"
    write(path, human_rows())
    return path


def test_a_human_file_gives_the_human_share_its_feedback(human_file):
    from laffi_exp.core.prompts import Prompter
    from laffi_exp.stages.train_data import laffi_pairs

    before = human_file.read_bytes()
    result = annotate(EXAMPLES, ANSWERS, HumanFileAnnotator(str(human_file)), RuleBasedAnnotator(), RATIO, SEED)
    rows = {r["id"]: r for r in human_rows()}
    assert len(rows) == len(CHOSEN) > 10 and result.fallback == 0
    for f in result.feedback:
        assert f.prediction == PREDICTIONS[f.id]
        if f.id in CHOSEN:
            assert f.source == "human"
            assert f.annotator == (rows[f.id]["annotator_id"] or "human_file")
            assert f.feedback == " ".join(rows[f.id]["feedback"].split())
        else:
            assert (f.source, f.annotator) == ("synthetic", "rule_based")
    by_id = {ex.id: ex for ex in EXAMPLES}
    for f in result.feedback:  # the verdict and correction the people's words give
        if f.source == "human":
            right = f.prediction == by_id[f.id].gold
            wrong = ("incorrect", by_id[f.id].gold) if by_id[f.id].answers else ("no_answer", "")
            assert (f.verdict, f.correction) == (("correct", None) if right else wrong), f
    assert {f.annotator for f in result.feedback} == {"alice", "human_file", "rule_based"}
    # Trains as it is: the fine-tuning targets are the people's words.
    targets = {p.id: p.target for p in laffi_pairs(EXAMPLES, result.feedback, Prompter())}
    assert all(targets[i] == " " + " ".join(rows[i]["feedback"].split()) for i in CHOSEN)
    assert human_file.read_bytes() == before  # imported files are only read


def test_an_unknown_on_missing_is_refused():
    with pytest.raises(ConfigError, match="feedback.human.on_missing: expected one of error, synthetic"):
        HumanFileAnnotator("any.csv", on_missing="maybe").check()


def test_the_config_reads_a_file_at_check_time(tmp_path, human_file):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from laffi_exp.core.config import CONF_DIR

    def pool(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return instantiate(compose(config_name="config", overrides=list(overrides)).feedback.human)

    assert pool().name == "simulated_human"
    given = pool("feedback/human=file", f"feedback.human.path={human_file}", "feedback.human.on_missing=synthetic")
    given.check()
    assert (given.on_missing, len(given.rows)) == ("synthetic", len(CHOSEN))
    absent = pool(
        "feedback/human=file", f"feedback.human.path={tmp_path / 'absent.csv'}"
    )  # built without reading: no Hydra wrapping
    with pytest.raises(ConfigError, match=r"feedback\.human\.path: no such file .*absent\.csv"):
        absent.check()


def _edit(rows, **by_id):
    """Rows with some replaced (a dict) or dropped (None), by id."""
    return [by_id.get(r["id"], r) for r in rows if by_id.get(r["id"], r) is not None]


BAD_FILES = [
    ("duplicate", lambda rows: [*rows, rows[0]], ["1 duplicate id", f"(lines 1, {len(human_rows()) + 1})"]),
    (
        "empty feedback",
        lambda rows: _edit(rows, **{rows[1]["id"]: {**rows[1], "feedback": "  \n "}}),
        ["empty feedback for 1 id"],
    ),
    (
        "missing value",
        lambda rows: _edit(rows, **{rows[2]["id"]: {k: v for k, v in rows[2].items() if k != "prediction"}}),
        ["a required column (id, prediction, feedback) is missing on line 3"],
    ),
]


@pytest.mark.parametrize(("name", "change", "needles"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_rows_are_refused_by_id_and_file(name, change, needles, tmp_path):
    rows = change(human_rows())
    path = tmp_path / "human.jsonl"
    write(path, rows)
    with pytest.raises(ConfigError) as err:
        HumanFileAnnotator(str(path)).check()
    message = str(err.value)
    assert "feedback.human.path" in message and str(path) in message
    for needle in needles:
        assert needle in message
    if name != "missing value":
        assert human_rows()[0 if name == "duplicate" else 1]["id"] in message


def test_file_level_problems_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"feedback\.human\.path: no such file .*nope\.csv"):
        HumanFileAnnotator(str(tmp_path / "nope.csv")).check()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": "q1", "prediction": "", "feedback": "Correct."}\n\n{"id": "q2", "prediction": \n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl: not a JSON object on 1 line: line 3 \(Expecting value\)"):
        HumanFileAnnotator(str(bad_json)).check()
    no_column = tmp_path / "no_column.csv"
    no_column.write_text("id,prediction,comment\nq1,Bob,Correct.\n")
    with pytest.raises(ConfigError, match=r"no_column\.csv: the header lacks the required column\(s\) feedback"):
        HumanFileAnnotator(str(no_column)).check()
    unquoted = tmp_path / "unquoted.csv"
    unquoted.write_text("id,prediction,feedback\nq1,Bob,Correct.\nq2,Bob,Wrong, it is Ann.\n")
    with pytest.raises(ConfigError, match=r"unquoted\.csv: more fields than the header on line 3"):
        HumanFileAnnotator(str(unquoted)).check()
    other = tmp_path / "human.txt"
    other.write_text("q1 Bob Correct.\n")
    with pytest.raises(ConfigError, match=r"expected a \.jsonl or \.csv file"):
        HumanFileAnnotator(str(other)).check()


def test_stale_and_missing_feedback_refuse_the_run(tmp_path):
    rows = human_rows()
    stale, gone = rows[0]["id"], [rows[1]["id"], rows[2]["id"]]
    path = tmp_path / "human.csv"
    write(path, _edit(rows, **{stale: {**rows[0], "prediction": "Someone else"}}, **dict.fromkeys(gone)))
    pool = HumanFileAnnotator(str(path))
    with pytest.raises(ConfigError) as err:
        annotate(EXAMPLES, ANSWERS, pool, RuleBasedAnnotator(), RATIO, SEED)
    message = str(err.value)
    assert "feedback.human.path" in message and str(path) in message
    assert "stale feedback (written for another prediction than the run's) for 1 id" in message
    assert f"{stale} (file 'Someone else', run {PREDICTIONS[stale]!r})" in message
    assert f"no feedback for 2 ids the ratio assigns to humans: {gone[0]}, {gone[1]}" in message
    assert "feedback.human.on_missing=synthetic" in message


def test_on_missing_synthetic_falls_back_and_counts(tmp_path):
    rows = human_rows()
    stale, gone = rows[0]["id"], rows[1]["id"]
    path = tmp_path / "human.jsonl"
    write(path, _edit(rows, **{stale: {**rows[0], "prediction": "Someone else"}, gone: None}))
    before = path.read_bytes()
    pool = HumanFileAnnotator(str(path), on_missing="synthetic")
    check = pool.check_against(EXAMPLES, ANSWERS, CHOSEN)
    assert (check.stale, check.missing, set(check.fallback)) == ((stale,), (gone,), {stale, gone})
    result = annotate(EXAMPLES, ANSWERS, pool, RuleBasedAnnotator(), RATIO, SEED)
    assert result.fallback == 2
    sources = {f.id: f.source for f in result.feedback}
    assert sources[stale] == sources[gone] == "synthetic"
    assert sum(s == "human" for s in sources.values()) == len(CHOSEN) - 2
    assert path.read_bytes() == before


def test_unknown_and_unassigned_ids_are_reported_not_used(tmp_path):
    extra = [{"id": "elsewhere", "prediction": "x", "feedback": "Correct."}]
    unassigned = next(ex for ex in EXAMPLES if ex.id not in CHOSEN)
    extra.append({"id": unassigned.id, "prediction": PREDICTIONS[unassigned.id], "feedback": "Correct."})
    path = tmp_path / "human.jsonl"
    write(path, human_rows() + [{"annotator_id": "", **r} for r in extra])
    pool = HumanFileAnnotator(str(path))
    check = pool.check_against(EXAMPLES, ANSWERS, CHOSEN)
    assert check.unknown == ("elsewhere",) and check.unassigned == (unassigned.id,)
    assert len(check.used) == len(CHOSEN) and check.fallback == ()
    assert "1 unknown ids ignored (elsewhere)" in check.summary()
    result = annotate(EXAMPLES, ANSWERS, pool, RuleBasedAnnotator(), RATIO, SEED)
    assert next(f for f in result.feedback if f.id == unassigned.id).source == "synthetic"


def test_export_writes_the_nested_human_share(tmp_path):
    ids = [ex.id for ex in EXAMPLES]
    low, high = human_ids(ids, 0.3, SEED), human_ids(ids, 0.6, SEED)
    jsonl_path, csv_path = export_batch(EXAMPLES, ANSWERS, low, tmp_path / "low")
    export_batch(EXAMPLES, ANSWERS, high, tmp_path / "high")

    def read(p):
        with open(p, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    low_rows, high_rows = read(csv_path), read(tmp_path / "high.csv")
    assert [r["id"] for r in low_rows] == [i for i in ids if i in low]  # in example order
    assert {r["id"] for r in low_rows} < {r["id"] for r in high_rows}
    assert [json.loads(line) for line in jsonl_path.read_text().splitlines()] == low_rows
    assert list(low_rows[0]) == ["id", "context", "question", "prediction", "feedback", "annotator_id"]
    by_id = {ex.id: ex for ex in EXAMPLES}
    for row in low_rows:  # multi-line contexts with commas survive the CSV round trip
        assert row["context"] == by_id[row["id"]].context and "\n" in row["context"]
        assert row["prediction"] == (PREDICTIONS[row["id"]] or "unanswerable")
        assert row["feedback"] == row["annotator_id"] == ""
    export_batch(EXAMPLES, ANSWERS, ["q1", "q4"], tmp_path / "gold", include_gold=True)
    gold = read(tmp_path / "gold.csv")
    assert [(r["id"], r["gold"]) for r in gold] == [("q1", "Ann1"), ("q4", "unanswerable")]


def test_export_refuses_to_overwrite_and_unknown_ids(tmp_path):
    export_batch(EXAMPLES, ANSWERS, ["q1"], tmp_path / "batch")
    with pytest.raises(ConfigError, match="batch.jsonl exists"):
        export_batch(EXAMPLES, ANSWERS, ["q2"], tmp_path / "batch")
    export_batch(EXAMPLES, ANSWERS, ["q2"], tmp_path / "batch", overwrite=True)
    assert json.loads((tmp_path / "batch.jsonl").read_text())["id"] == "q2"
    with pytest.raises(ConfigError, match="2 ids not among .*: nope1, nope2"):
        export_batch(EXAMPLES, ANSWERS, ["q1", "nope1", "nope2"], tmp_path / "other")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_exported_batch_filled_in_imports(fmt, tmp_path):
    jsonl_path, csv_path = export_batch(EXAMPLES, ANSWERS, CHOSEN, tmp_path / "batch")
    exported = jsonl_path if fmt == "jsonl" else csv_path
    if fmt == "jsonl":
        rows = [json.loads(line) for line in exported.read_text().splitlines()]
    else:
        with open(exported, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    for row in rows:  # an annotator at work
        row["feedback"] = "Correct." if row["prediction"] == "Bob" else 'Incorrect, it says\n"Ann".'
        row["annotator_id"] = "carol"
    filled = tmp_path / f"filled.{fmt}"
    write(filled, rows)
    result = annotate(EXAMPLES, ANSWERS, HumanFileAnnotator(filled), RuleBasedAnnotator(), RATIO, SEED)
    human = [f for f in result.feedback if f.source == "human"]
    assert {f.id for f in human} == CHOSEN and {f.annotator for f in human} == {"carol"}
    assert all(f.feedback == ("Correct." if f.prediction == "Bob" else 'Incorrect, it says "Ann".') for f in human)
