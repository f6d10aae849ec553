"""The annotation app's server and commands: the API over the store (in process), the local-only and
token guards, the page served with nothing from elsewhere, bad input in one line, and a real server
killed mid-work and started again with every save still there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the annotation app needs the app extra: pip install -e '.[app]'")

from starlette.testclient import TestClient

from laffi_exp.annotate import main
from laffi_exp.annotation_app.batch import read_batch
from laffi_exp.annotation_app.server import STATIC, create_app
from laffi_exp.annotation_app.store import Store

from .annotation_helpers import IDS, call, make_batch, serve

ROOT = Path(__file__).resolve().parents[1]
LOCAL = "http://127.0.0.1"


@pytest.fixture
def store(tmp_path):
    return Store.for_batch(tmp_path / "batch.annotations.sqlite", read_batch(make_batch(tmp_path, include_gold=True)))


@pytest.fixture
def client(store):
    with TestClient(create_app(store, chunk=5), base_url=LOCAL) as client:
        yield client


def _signed_in(client, name="alice"):
    assert client.post("/api/signin", json={"annotator": name}).json() == {"annotator": name}
    return f"/api/annotators/{name}"


def test_sign_in_queue_and_one_item_as_the_page_shows_it(client):
    info = client.get("/api/info").json()
    assert (info["batch"], info["items"], info["per_item"], info["no_answer_text"]) == (
        "batch.jsonl",
        12,
        1,
        "unanswerable",
    )
    assert set(info["templates"]) == {"correct", "incorrect", "no_answer"}
    me = _signed_in(client)
    queue = client.get(f"{me}/queue").json()
    assert [q["id"] for q in queue["items"]] == IDS[:5]  # the first chunk
    assert queue["progress"] == {
        "open": 5,
        "saved": 0,
        "flagged": 0,
        "assigned": 5,
        "batch_items": 12,
        "batch_complete": 0,
        "per_item": 1,
    }
    item = client.get(f"{me}/items/q2").json()
    assert (item["prediction"], item["no_answer"], item["gold"]) == ("Oslo", False, "Ann2")
    assert item["context"][slice(*item["span"])] == "Oslo"  # the model's answer, where it is in the passage
    no_answer = client.get(f"{me}/items/q0").json()
    assert (no_answer["prediction"], no_answer["no_answer"], no_answer["span"]) == ("", True, None)
    assert no_answer["gold"] == "unanswerable"
    assert item["annotation"] == {
        "status": "open",
        "feedback": "",
        "correction": "",
        "revision": 0,
        "seconds": 0.0,
        "updated_at": None,
        "edits": 0,
        "reads_as": {"verdict": None, "correction": None},
    }


def test_a_save_then_a_stale_one_from_another_tab_is_refused_with_a_message(client, store):
    me = _signed_in(client)
    client.get(f"{me}/queue")
    body = {"revision": 0, "feedback": 'Incorrect. The answer is "Ann2".', "correction": "Ann2", "seconds": 12.5}
    saved = client.put(f"{me}/items/q2", json=body)
    assert saved.status_code == 200
    annotation = saved.json()["annotation"]
    assert (annotation["revision"], annotation["status"], annotation["seconds"]) == (1, "saved", 12.5)
    assert annotation["reads_as"] == {"verdict": "incorrect", "correction": "Ann2"}
    other_tab = client.put(f"{me}/items/q2", json={**body, "feedback": "Correct."})
    assert other_tab.status_code == 409
    assert "was saved elsewhere (another tab?)" in other_tab.json()["error"]
    assert other_tab.json()["current"]["feedback"] == body["feedback"]
    merged = client.put(f"{me}/items/q2", json={**body, "feedback": "Correct.", "revision": 1})  # deliberately over it
    assert merged.json()["annotation"]["revision"] == 2
    assert [e["feedback"] for e in store.edits("q2")] == [body["feedback"], "Correct."]
    queue = client.get(f"{me}/queue").json()
    assert next(q for q in queue["items"] if q["id"] == "q2")["verdict"] == "correct"
    assert queue["progress"]["saved"] == 1


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        ("post", "/api/signin", {"json": {"annotator": "al ice"}}, 400, "annotator id: expected"),
        (
            "post",
            "/api/signin",
            {"content": "annotator=alice", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            415,
            "expected a JSON body",
        ),
        ("post", "/api/signin", {"content": "{", "headers": {"Content-Type": "application/json"}}, 400, "not JSON"),
        ("get", "/api/annotators/nobody/queue", {}, 404, "'nobody' has not signed in"),
        ("get", "/api/annotators/alice/items/q11", {}, 404, "'q11' is not assigned to 'alice'"),
        ("put", "/api/annotators/alice/items/q1", {"json": {"revision": 0, "feedback": " "}}, 400, "feedback is empty"),
        (
            "put",
            "/api/annotators/alice/items/q1",
            {"json": {"revision": 0, "feedback": "Correct.", "seconds": -3}},
            400,
            "seconds: expected",
        ),
    ],
)
def test_bad_requests_get_a_status_and_a_message(client, method, path, kwargs, status, needle):
    me = _signed_in(client)
    client.get(f"{me}/queue")
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status and needle in response.json()["error"]


def test_local_only_without_a_token(store):
    with TestClient(create_app(store), base_url="http://evil.example") as client:
        assert client.get("/api/info").status_code == 403  # a rebinding name pointed at 127.0.0.1
    for base in ("http://localhost:8765", "http://[::1]:8765", LOCAL):
        with TestClient(create_app(store), base_url=base) as client:
            assert client.get("/api/info").status_code == 200, base


def test_beyond_localhost_every_request_carries_the_token(store):
    app = create_app(store, token="s3cret")
    with TestClient(app, base_url="http://10.1.2.3:8765") as client:
        assert client.get("/api/info").status_code == 401 and "token" in client.get("/api/info").json()["error"]
        assert client.get("/api/info", headers={"X-Token": "wrong"}).status_code == 401
        assert client.get("/api/info", headers={"X-Token": "s3cret"}).status_code == 200
        page = client.get("/?token=s3cret")
        assert page.status_code == 200 and "laffi_token" in page.headers["set-cookie"]
        assert client.get("/static/app.js").status_code == 200  # the page's files carry it as the cookie


def test_the_page_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for name in ("app.js", "app.css"):
        assert client.get(f"/static/{name}").status_code == 200
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path  # no CDN, no remote font
        assert "@import" not in text and "url(http" not in text, path
    assert client.get("/static/nope.js").status_code == 404


# -- the commands ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["serve", "{tmp}/absent.jsonl"], "absent.jsonl: no such file (expected the .jsonl file that"),
        (["serve", "{tmp}/batch.csv"], "not the .csv beside it"),
        (["serve", "{tmp}/rows.jsonl"], "rows.jsonl: line 1 lacks the text column(s)"),
        (
            ["serve", "{tmp}/batch.jsonl", "--host", "0.0.0.0"],
            "--host 0.0.0.0: not a local address; pass --allow-remote",
        ),
        (["serve", "{tmp}/batch.jsonl", "--db", "{tmp}/other.sqlite"], "holds the annotations of another batch"),
        (["serve", "{tmp}/batch.jsonl", "--per-item", "0"], "--per-item: expected an integer >= 1"),
        (["serve", "{tmp}/batch.jsonl", "--port", "http"], "--port: expected a port"),
        (["export-db", "--db", "{tmp}/absent.sqlite", "--out", "{tmp}/h.jsonl"], "absent.sqlite: no such file"),
        (["export-db", "--db", "{tmp}/batch.jsonl", "--out", "{tmp}/h.jsonl"], "batch.jsonl: not an annotation store"),
        (
            ["export-db", "--db", "{tmp}/other.sqlite", "--out", "{tmp}/h.jsonl", "seed=1"],
            "overrides (seed=1) are for --check",
        ),
        (["export-db", "--db", "{tmp}/other.sqlite"], "the following arguments are required: --out"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, needle, tmp_path, capsys):
    make_batch(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"id": "q1", "prediction": "x", "feedback": "Correct."}\n')
    Store.for_batch(tmp_path / "other.sqlite", read_batch(make_batch(tmp_path, IDS[:3], name="other")))
    assert _exit_code([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, err


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # the command-line parser's errors
        return done.code


def test_export_db_command_writes_the_file_and_the_report(store, tmp_path, capsys):
    store.sign_in("alice")
    store.queue("alice")
    store.save("alice", "q1", revision=0, feedback="Correct.", seconds=7)
    out = tmp_path / "human.jsonl"
    assert main(["export-db", "--db", str(store.path), "--out", str(out)]) == 0
    assert "wrote 1 rows (majority)" in capsys.readouterr().out
    assert json.loads(out.read_text())["feedback"] == "Correct."
    assert json.loads((tmp_path / "annotation_report.json").read_text())["time"]["total"] == 7.0
    assert main(["export-db", "--db", str(store.path), "--out", str(out)]) == 2  # refuses to overwrite
    assert "exists: choose another path or pass --force" in capsys.readouterr().err


def test_a_plain_import_of_the_annotate_module_loads_no_web_stack():
    code = "import sys, laffi_exp.annotate; print(sorted(m for m in ('starlette', 'uvicorn') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stderr


# -- a real server, killed ---------------------------------------------------------------------------
def test_a_killed_server_loses_no_save_and_parallel_saves_conflict(tmp_path):
    batch = make_batch(tmp_path)
    proc, url = serve(batch)
    try:
        assert call(f"{url}api/signin", "POST", {"annotator": "alice"})[0] == 200
        call(f"{url}api/annotators/alice/queue")
        assert (
            call(f"{url}api/annotators/alice/items/q1", "PUT", {"revision": 0, "feedback": "Correct.", "seconds": 3})[0]
            == 200
        )
        results = []  # two tabs save the same revision at once: one is stored, one refused
        tabs = [
            threading.Thread(
                target=lambda n=n: results.append(
                    call(
                        f"{url}api/annotators/alice/items/q3", "PUT", {"revision": 0, "feedback": f"Correct, tab {n}."}
                    )[0]
                )
            )
            for n in (1, 2)
        ]
        for t in tabs:
            t.start()
        for t in tabs:
            t.join()
        assert sorted(results) == [200, 409]
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no chance to flush anything
        proc.wait(timeout=30)
    proc, url = serve(batch)
    try:
        status, item = call(f"{url}api/annotators/alice/items/q1")
        assert status == 200 and item["annotation"]["feedback"] == "Correct." and item["annotation"]["seconds"] == 3.0
        assert call(f"{url}api/annotators/alice/items/q3")[1]["annotation"]["revision"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (tmp_path / "batch.annotations.sqlite").is_file()


def test_a_port_in_use_is_one_line(tmp_path, capsys):
    import socket

    batch = make_batch(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(batch), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 127.0.0.1 --port ") and "cannot listen there (Address already in use)" in err


def test_export_db_check_runs_the_checks_of_the_run(store, tmp_path, monkeypatch, capsys):
    from laffi_exp.stages import answer as answer_stage

    from .annotation_helpers import ANSWERS, EXAMPLES

    answers = list(ANSWERS)

    def stage1_answers(cfg):  # the run's answers, as the stage cache would give them
        return {"train": EXAMPLES[:8], "validation": EXAMPLES[8:]}, {"train": answers[:8], "validation": answers[8:]}

    monkeypatch.setattr(answer_stage, "stage1_answers", stage1_answers)
    store.sign_in("alice")
    store.queue("alice")
    for item_id in IDS[:5]:
        store.save("alice", item_id, revision=0, feedback="Correct.")
    out, every = tmp_path / "human.jsonl", "feedback.human_ratio=1.0"  # every id goes to humans
    args = ["export-db", "--db", str(store.path), "--out", str(out), "--force", "--check", every]
    assert main([*args, "feedback.human.on_missing=synthetic"]) == 0
    assert "check: human feedback" in capsys.readouterr().out
    answers[1] = answers[1].__class__("q1", "", "Someone else", "")  # the run now answers q1 otherwise
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --check: feedback.human.path: ") and len(err.strip().splitlines()) == 1
    assert "stale feedback" in err and "q1 (file 'Ann1', run 'Someone else')" in err and "no feedback for 7 ids" in err
    assert f"({out} is written all the same)" in err
