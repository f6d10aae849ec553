"""The annotation store and export-db: revisions that refuse stale saves (also under concurrent saves),
assignment to k annotators, every edit and second recorded, and an export that feedback.human.path reads
with its own checks."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from laffi_exp.annotation_app.batch import answer_span, read_batch
from laffi_exp.annotation_app.export import choose, export_db
from laffi_exp.annotation_app.store import Conflict, NotFound, Store
from laffi_exp.core.errors import ConfigError
from laffi_exp.feedback.human import HumanFileAnnotator

from .annotation_helpers import ANSWERS, EXAMPLES, IDS, PREDICTIONS, make_batch


@pytest.fixture
def batch(tmp_path):
    return read_batch(make_batch(tmp_path))


@pytest.fixture
def store(batch, tmp_path):
    return Store.for_batch(tmp_path / "batch.annotations.sqlite", batch)


def _signed_in(store, *names):
    for name in names:
        store.sign_in(name)
    return store


def test_the_store_holds_the_batch_in_wal_mode(store, batch):
    assert [i.id for i in store.items()] == IDS and store.items() == list(batch.items)
    assert store.items()[0].prediction == "unanswerable"  # as exported: the no-answer text
    with sqlite3.connect(store.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    meta = store.meta()
    assert (meta["items"], meta["per_item"], meta["batch_fingerprint"]) == ("12", "1", batch.fingerprint)


def test_a_store_of_another_batch_or_no_store_is_refused(store, tmp_path):
    other = read_batch(make_batch(tmp_path, IDS[:5], name="other"))
    with pytest.raises(
        ConfigError, match=r"--db .*batch\.annotations\.sqlite: holds the annotations of another batch .*12 items"
    ):
        Store.for_batch(store.path, other)
    Store.for_batch(store.path, read_batch(tmp_path / "batch.jsonl"), per_item=2)  # the same batch: reopened
    assert store.per_item == 2
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all, just text " * 20)
    with pytest.raises(ConfigError, match="junk.sqlite: not an annotation store"):
        Store.existing(junk)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    with pytest.raises(ConfigError, match="foreign.sqlite: not an annotation store"):
        Store.existing(foreign)
    with pytest.raises(ConfigError, match="absent.sqlite: no such file"):
        Store.existing(tmp_path / "absent.sqlite")


def test_a_save_with_a_stale_revision_is_refused_and_every_edit_is_kept(store):
    _signed_in(store, "alice")
    store.queue("alice")
    first = store.save("alice", "q1", revision=0, feedback="Correct.", seconds=4.5)
    assert (first["revision"], first["status"], first["seconds"]) == (1, "saved", 4.5)
    with pytest.raises(Conflict, match=r"not saved: item q1 was saved elsewhere .*revision 1 .*this page had 0") as err:
        store.save("alice", "q1", revision=0, feedback="Wrong.", seconds=1)
    assert err.value.current["feedback"] == "Correct."
    second = store.save(
        "alice", "q1", revision=1, feedback='Incorrect. The answer is "Ann1".', correction="Ann1", seconds=2
    )
    assert (second["revision"], second["seconds"], second["edits"]) == (2, 6.5, 2)
    edits = store.edits("q1")
    assert [(e["revision"], e["feedback"], e["seconds"]) for e in edits] == [
        (1, "Correct.", 4.5),
        (2, 'Incorrect. The answer is "Ann1".', 2.0),
    ]
    assert store.item("alice", "q1")["feedback"] == 'Incorrect. The answer is "Ann1".'


def test_concurrent_saves_of_one_revision_one_wins(store):
    _signed_in(store, "alice")
    store.queue("alice")
    start, results = threading.Barrier(6), []

    def save(n):
        start.wait()
        try:
            store.save("alice", "q2", revision=0, feedback=f"Correct, says tab {n}.")
            results.append(("saved", n))
        except Conflict:
            results.append(("refused", n))

    threads = [threading.Thread(target=save, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = [n for kind, n in results if kind == "saved"]
    assert len(results) == 6 and len(saved) == 1
    assert store.item("alice", "q2")["feedback"] == f"Correct, says tab {saved[0]}." and len(store.edits("q2")) == 1


def test_items_go_to_k_annotators_in_chunks(tmp_path, batch):
    store = _signed_in(Store.for_batch(tmp_path / "k.sqlite", batch, per_item=2), "alice", "bob", "carol")
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids(store.queue("alice", chunk=4)) == IDS[:4]
    assert ids(store.queue("alice", chunk=4)) == IDS[:4]  # nothing new while some are open
    assert ids(store.queue("bob", chunk=4)) == IDS[:4]  # the second annotator of the same items
    assert ids(store.queue("carol", chunk=4)) == IDS[4:8]  # those have two annotators already
    for i, item_id in enumerate(IDS[:4]):
        store.save(
            "alice", item_id, revision=0, feedback="Correct." if i else "", status="flagged" if i == 0 else "saved"
        )
    assert ids(store.queue("alice", chunk=4)) == IDS[:8]  # flagged counts as done: the next chunk
    progress = store.progress("alice")
    assert (progress["assigned"], progress["saved"], progress["flagged"], progress["open"]) == (8, 3, 1, 4)
    assert (progress["batch_items"], progress["batch_complete"]) == (12, 0)  # no item has two saves yet
    with pytest.raises(NotFound, match="item 'q9' is not assigned to 'bob'"):
        store.item("bob", "q9")
    with pytest.raises(NotFound, match="'dave' has not signed in"):
        store.queue("dave")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"feedback": "  "}, "feedback is empty"),
        ({"seconds": -1}, "seconds: expected a number of seconds"),
        ({"seconds": "3"}, "seconds: expected a number of seconds"),
        ({"revision": "0"}, "revision: expected an integer"),
        ({"feedback": "x" * 5001}, "feedback: 5001 characters, at most 5000"),
        ({"status": "done"}, "status: expected saved or flagged"),
    ],
)
def test_bad_saves_are_refused_with_the_reason(store, change, needle):
    _signed_in(store, "alice")
    store.queue("alice")
    with pytest.raises(ValueError, match=needle):
        store.save("alice", "q1", **{"revision": 0, "feedback": "Correct.", **change})
    assert store.item("alice", "q1")["revision"] == 0 and store.edits() == []
    for bad in ("", " ", "-alice", "a" * 65, "al ice", None):
        with pytest.raises(ValueError, match="annotator id"):
            store.sign_in(bad)


def test_the_answer_is_found_in_the_passage():
    assert answer_span("Ann painted it in Oslo.", "Oslo") == (18, 22)
    assert answer_span("Ann painted it in OSLO.", "oslo") == (18, 22)  # case aside
    assert answer_span("Ann painted it.", "Bob") is None and answer_span("text", "") is None


def test_a_file_that_is_not_an_exported_batch_is_refused(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": "q1", "prediction": "x", "feedback": "Correct."}\n')
    (tmp_path / "bad.jsonl").write_text('{"id": "q1",\n')
    (tmp_path / "dup.jsonl").write_text(2 * '{"id": "q1", "context": "c", "question": "q", "prediction": "p"}\n')
    cases = {
        "rows.jsonl": "line 1 lacks the text column(s) id, context, question, prediction; expected the .jsonl",
        "bad.jsonl": "line 1 is not JSON",
        "dup.jsonl": "line 2: the id 'q1' comes twice",
        "absent.jsonl": "no such file",
        "batch.csv": "(not the .csv beside it)",
    }
    for name, needle in cases.items():
        with pytest.raises(ConfigError) as err:
            read_batch(tmp_path / name)
        assert needle in str(err.value) and name in str(err.value)


# -- export-db -------------------------------------------------------------------------------------
def _annotations(*verdict_texts):
    return [{"feedback": text, "annotator_id": f"a{n}"} for n, text in enumerate(verdict_texts)]


def test_majority_first_and_all():
    three = _annotations("Correct.", 'Incorrect. The answer is "Ann".', "Wrong: it is Ann.")
    assert choose(three, "majority") == [three[1]]  # incorrect twice: the earlier of the two
    assert choose(three, "first") == [three[0]] and choose(three, "all") == three
    tie = _annotations("Wrong.", "Correct.")
    assert choose(tie, "majority") == [tie[0]]  # a tie goes to the verdict given first


def test_export_db_writes_the_human_file_the_run_reads(store, tmp_path):
    _signed_in(store, "alice")
    store.queue("alice")
    texts = {
        "q0": "Correct. The passage does not say who painted it.",
        "q1": "Correct.",
        "q2": 'Incorrect. The answer is "Ann2".',
    }
    for n, (item_id, text) in enumerate(texts.items()):
        store.save("alice", item_id, revision=0, feedback=text, seconds=10.0 * (n + 1))
    store.save("alice", "q3", revision=0, feedback="", status="flagged")
    out = tmp_path / "human.jsonl"
    rows, report = export_db(store, out)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    assert PREDICTIONS["q0"] == "" and rows[0] == {
        "id": "q0",
        "question": EXAMPLES[0].question,
        "prediction": "unanswerable",
        "feedback": texts["q0"],
        "annotator_id": "alice",
        "seconds": 10.0,
    }
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    # The run's reader takes it as it is, with its own checks: the exported no-answer text is no answer,
    # unannotated ids are missing, and an answer that changed since the export is stale.
    pool = HumanFileAnnotator(str(out))
    check = pool.check_against(EXAMPLES, ANSWERS, ["q0", "q1", "q2"])
    assert check.used == ("q0", "q1", "q2") and check.stale == check.missing == ()
    assert pool.time_report(check.used) == {"count": 3, "total": 60.0, "median": 20.0, "mean": 20.0}
    with pytest.raises(ConfigError, match=r"no feedback for 1 id the ratio assigns to humans: q3"):
        pool.check_against(EXAMPLES, ANSWERS, ["q0", "q1", "q3"])
    moved = [a if a.id != "q1" else a.__class__(a.id, a.question, "Bob", "") for a in ANSWERS]
    with pytest.raises(ConfigError, match=r"stale feedback .* for 1 id: q1 \(file 'Ann1', run 'Bob'\)"):
        pool.check_against(EXAMPLES, moved, ["q0", "q1", "q2"])
    saved = json.loads((tmp_path / "annotation_report.json").read_text())
    assert saved == report
    assert report["coverage"] == {"annotated": 3, "complete": 3, "flagged": 1, "missing": 9, "missing_ids": IDS[3:]}
    assert report["time"] == {"count": 3, "total": 60.0, "median": 20.0, "mean": 20.0}
    assert report["annotators"]["alice"] == {
        "assigned": 12,
        "open": 8,
        "saved": 3,
        "flagged": 1,
        "time": {"count": 3, "total": 60.0, "median": 20.0, "mean": 20.0},
    }
    assert report["agreement"] is None  # one annotator per item


def test_export_db_with_two_annotators_reports_their_agreement(tmp_path, batch):
    store = _signed_in(Store.for_batch(tmp_path / "k.sqlite", batch, per_item=2), "alice", "bob")
    store.queue("alice", chunk=4), store.queue("bob", chunk=4)
    # alice: c c i i, bob: c i i i on q0..q3: agreement 3/4; chance .5 * .25 + .5 * .75 = .5; kappa .5
    alice = ["Correct.", "Correct.", "Wrong.", "Wrong."]
    bob = ["Correct.", 'Incorrect. The answer is "Ann1".', "Wrong.", "Wrong."]
    for item_id, a, b in zip(IDS, alice, bob):
        store.save("alice", item_id, revision=0, feedback=a, seconds=3)
        store.save("bob", item_id, revision=0, feedback=b, seconds=5)
    _, report = export_db(store, tmp_path / "human.jsonl", "first")
    agreement = report["agreement"]
    assert (agreement["items"], agreement["count"], agreement["verdict_agreement"]) == (4, 4, 0.75)
    assert agreement["kappa"] == pytest.approx(0.5) and list(agreement["pairs"]) == ["alice|bob"]
    assert report["coverage"]["complete"] == 4 and report["time"]["total"] == 32.0
    rows = [json.loads(line) for line in (tmp_path / "human.jsonl").read_text().splitlines()]
    assert [r["annotator_id"] for r in rows] == ["alice"] * 4  # first: alice saved each one first
    every, _ = export_db(store, tmp_path / "all.jsonl", "all")
    assert len(every) == 8
    with pytest.raises(ConfigError, match="all.jsonl exists: choose another path or pass --force"):
        export_db(store, tmp_path / "all.jsonl", "all")
    with pytest.raises(ConfigError, match=r"--out .*human\.csv: expected a \.jsonl path"):
        export_db(store, tmp_path / "human.csv")


def test_export_db_with_nothing_saved_is_refused(store, tmp_path):
    with pytest.raises(ConfigError, match="no saved annotations yet"):
        export_db(store, tmp_path / "human.jsonl")
    assert not (tmp_path / "human.jsonl").exists()


def test_the_reader_refuses_seconds_that_are_not_a_time(tmp_path):
    path = tmp_path / "human.csv"
    path.write_text(
        "id,prediction,feedback,seconds\nq1,Ann1,Correct.,12.5\nq2,Oslo,Wrong.,soon\nq3,Oslo,Wrong.,-2\n"
        "q5,Ann5,Correct.,\n"
    )
    with pytest.raises(ConfigError, match=r"human\.csv: seconds is not a number >= 0 on lines 3, 4"):
        HumanFileAnnotator(str(path)).check()
    path.write_text("id,prediction,feedback,seconds\nq1,Ann1,Correct.,12.5\nq5,Ann5,Correct.,\n")
    pool = HumanFileAnnotator(str(path))
    assert [r.seconds for r in pool.rows.values()] == [12.5, None]
    assert pool.time_report(["q1", "q5"])["total"] == 12.5 and pool.time_report(["q5"]) is None
