"""SQuAD-layout data: reading and schema errors, the article-level split and stratified subsamples of
SquadJSON and SquadV2, skipped bad answers, and finding or downloading the official files (against a
local HTTP server: no network)."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate

from laffi_exp.core.config import validate
from laffi_exp.core.errors import ConfigError
from laffi_exp.data.squad import DEV_FILE, TRAIN_FILE, SquadJSON, SquadV2
from laffi_exp.data.squad_format import examples_from_squad, load_squad_file

from .conftest import SQUAD_DEV, needs


def _qas(squad):
    return [(p["context"], qa) for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]]


def _ids(squad):
    return [qa["id"] for _, qa in _qas(squad)]


def _unanswerable(squad):
    return sum(not qa["answers"] or qa.get("is_impossible", False) for _, qa in _qas(squad))


def make_squad(num_articles: int, prefix: str = "a", v1: bool = False) -> dict:
    """A SQuAD-layout file: articles of 3 to 7 questions, about a third unanswerable (none with v1)."""
    data = []
    for a in range(num_articles):
        title = f"{prefix}_article_{a}"
        context = f"{title} is about topic {prefix}{a}. It was written in year {1900 + a}."
        qas = []
        for j in range(3 + a % 5):
            qa = {"question": f"What is {title} about ({j})?", "id": f"{prefix}{a}q{j}"}
            if not v1 and (a + j) % 3 == 0:
                qa.update(answers=[], is_impossible=True, plausible_answers=[])
            else:
                text = f"topic {prefix}{a}"
                qa["answers"] = [{"text": text, "answer_start": context.index(text)}]
                if not v1:
                    qa["is_impossible"] = False
            qas.append(qa)
        data.append({"title": title, "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1" if v1 else "v2.0", "data": data}


def write(path: Path, squad: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(squad))
    return path


def assert_disjoint_articles(splits: dict) -> None:
    titles = {k: {a["title"] for a in v["data"]} for k, v in splits.items()}
    ids = {k: set(_ids(v)) for k, v in splits.items()}
    for x, y in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not titles[x] & titles[y], (x, y)
        assert not ids[x] & ids[y], (x, y)


def assert_stratified(split: dict, source: dict) -> None:
    n, total = len(_qas(split)), len(_qas(source))
    assert abs(_unanswerable(split) - n * _unanswerable(source) / total) <= 1


# --- reading a SQuAD object or file -------------------------------------------------------------


def _tiny_squad():
    return {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where is Paris?",
                                "answers": [{"text": "France", "answer_start": 12}],
                            },
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
    assert exs[0].answers == ("France",) and exs[0].answer_starts == (12,) and not exs[0].is_impossible
    assert exs[1].is_impossible and exs[1].gold == ""


MALFORMED = {
    "duplicate_id": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id="q1"),
        "duplicate question id 'q1' at data[0].paragraphs[0].qas[1]",
    ),
    "bad_answer_start": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=3),
        "question 'q1': answer_start 3",
    ),
    "answer_without_start": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].pop("answer_start"),
        "'q1'.*'answer_start'",
    ),
    "missing_qas": (lambda d: d["data"][0]["paragraphs"][0].pop("qas"), "data[0].paragraphs[0] has no 'qas'"),
    "missing_context": (
        lambda d: d["data"][0]["paragraphs"][0].pop("context"),
        "data[0].paragraphs[0] has no 'context'",
    ),
    "missing_id": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("id"),
        "data[0].paragraphs[0].qas[1]: a question has no 'id'",
    ),
    "missing_question": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("question"),
        "question 'q2'.*no 'question'",
    ),
    "missing_paragraphs": (lambda d: d["data"][0].pop("paragraphs"), "data[0] has no 'paragraphs'"),
    "missing_data": (lambda d: d.pop("data"), "'data' list"),
}


def _pattern(needle: str) -> str:
    return needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_squad_is_a_clear_error(case):
    mutate, needle = MALFORMED[case]
    data = _tiny_squad()
    mutate(data)
    with pytest.raises(ConfigError, match="^bad.json: .*" + _pattern(needle)):
        examples_from_squad(data, source="bad.json")


@pytest.mark.parametrize("case", [c for c in MALFORMED if c != "bad_answer_start"])
def test_malformed_file_names_the_file_and_place(case, tmp_path):
    mutate, needle = MALFORMED[case]
    squad = make_squad(6)
    squad["data"][:1] = _tiny_squad()["data"]
    mutate(squad)
    path = write(tmp_path / "bad.json", squad)
    with pytest.raises(ConfigError, match=_pattern(str(path)) + ".*" + _pattern(needle)):
        SquadJSON(path=str(path), num_train=2, num_val=2, num_eval=2).splits()


def test_missing_and_invalid_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: file not found"):
        load_squad_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_squad_file(bad)
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        SquadJSON(path=str(bad)).splits()
    with pytest.raises(ConfigError, match="dataset.path"):
        SquadJSON(path=str(tmp_path / "nope.json")).check()


# --- article-level split and stratified subsamples ----------------------------------------------


def test_article_split_is_disjoint_deterministic_and_stratified(tmp_path):
    source = make_squad(60)
    path = write(tmp_path / "data.json", source)
    ds = SquadJSON(path=str(path), seed=3, num_train=60, num_val=20, num_eval=40)
    ds.check()
    splits = ds.splits()
    assert {k: len(_qas(v)) for k, v in splits.items()} == {"train": 60, "validation": 20, "test": 40}
    assert_disjoint_articles(splits)
    for split in splits.values():
        assert_stratified(split, source)
        assert examples_from_squad(split)  # each split is valid SQuAD layout
    again = SquadJSON(path=str(path), seed=3, num_train=60, num_val=20, num_eval=40).splits()
    assert json.dumps(again) == json.dumps(splits)
    other = SquadJSON(path=str(path), seed=4, num_train=60, num_val=20, num_eval=40).splits()
    assert _ids(other["test"]) != _ids(splits["test"])
    # the test questions depend only on the seed and num_eval, not on the other sizes
    bigger = SquadJSON(path=str(path), seed=3, num_train=90, num_val=30, num_eval=40).splits()
    assert _ids(bigger["test"]) == _ids(splits["test"])


def test_chosen_ids_name_the_questions_of_each_split_in_file_order(tmp_path):
    source = make_squad(40)
    ds = SquadJSON(path=str(write(tmp_path / "data.json", source)), seed=1, num_train=30, num_val=10, num_eval=20)
    splits = ds.splits()
    chosen = ds.chosen_ids()
    assert set(chosen) == {"train", "validation", "test"}
    order = {qid: i for i, qid in enumerate(_ids(source))}
    for split, ids in chosen.items():
        assert ids == _ids(splits[split])
        assert ids == sorted(ids, key=order.__getitem__)
    json.dumps(chosen)  # what the pipeline writes to chosen_ids.json
    # before splits() it is computed on demand, with the same result
    assert SquadJSON(path=ds.path, seed=1, num_train=30, num_val=10, num_eval=20).chosen_ids() == chosen


def test_squad_v1_file_without_is_impossible_counts_as_answerable(tmp_path):
    source = make_squad(30, v1=True)
    assert not any("is_impossible" in qa for _, qa in _qas(source))
    splits = SquadJSON(path=str(write(tmp_path / "v1.json", source)), num_train=20, num_val=10, num_eval=15).splits()
    assert {k: len(_qas(v)) for k, v in splits.items()} == {"train": 20, "validation": 10, "test": 15}
    for split in splits.values():
        assert not any(e.is_impossible for e in examples_from_squad(split))


@pytest.mark.parametrize(
    ("sizes", "needle"),
    [
        ({"num_eval": 10_000}, r"dataset\.num_eval: 10000 questions asked for, but data\.json has only 268 "),
        ({"num_eval": 230, "num_val": 60}, r"dataset\.num_val: 60 .* left after the test split have only \d+ "),
        (
            {"num_eval": 150, "num_val": 50, "num_train": 100},
            r"dataset\.num_train: 100 .* left after the test and validation splits have only \d+ ",
        ),
    ],
    ids=["num_eval", "num_val", "num_train"],
)
def test_a_size_larger_than_available_names_the_key_and_count(sizes, needle, tmp_path):
    source = make_squad(54)
    assert len(_qas(source)) == 268
    path = write(tmp_path / "data.json", source)
    ds = SquadJSON(path=str(path), **{"num_train": 10, "num_val": 10, "num_eval": 10, **sizes})
    ds.check()  # cheap: it does not read the file
    with pytest.raises(ConfigError, match=needle):
        ds.splits()


@pytest.mark.parametrize("key", ["num_train", "num_val", "num_eval"])
def test_non_positive_sizes_fail_the_cheap_check(key, tmp_path):
    with pytest.raises(ConfigError, match=f"dataset.{key}"):
        SquadJSON(path=str(write(tmp_path / "d.json", make_squad(3))), **{key: 0}).check()


def test_bad_answers_are_skipped_counted_and_logged_or_an_error(tmp_path, caplog):
    source = make_squad(40)
    bad_ids = []
    for a in (2, 5, 11):
        qa = next(qa for qa in source["data"][a]["paragraphs"][0]["qas"] if qa["answers"])
        qa["answers"][0]["answer_start"] += 1
        bad_ids.append(qa["id"])
    path = write(tmp_path / "data.json", source)
    ds = SquadJSON(path=str(path), num_train=30, num_val=10, num_eval=20)
    with caplog.at_level(logging.WARNING, logger="laffi_exp.data.squad"):
        splits = ds.splits()
    assert ds.skipped == 3 and ds.skipped_ids == bad_ids
    assert "skipped 3 question(s)" in caplog.text and bad_ids[0] in caplog.text and "data.json" in caplog.text
    chosen = {qid for ids in ds.chosen_ids().values() for qid in ids}
    assert not chosen & set(bad_ids)
    for name, split in splits.items():
        examples_from_squad(split, source=name)  # no bad answer is left for the pipeline to trip on
    strict = SquadJSON(path=str(path), num_train=30, num_val=10, num_eval=20, on_bad_answer="error")
    with pytest.raises(ConfigError, match=f"data.json: question '{bad_ids[0]}': answer_start"):
        strict.splits()
    with pytest.raises(ConfigError, match="dataset.on_bad_answer"):
        SquadJSON(path=str(path), on_bad_answer="ignore").check()


@needs(SQUAD_DEV)
def test_squad_json_splits_the_official_dev_file_by_article():
    source = load_squad_file(SQUAD_DEV)
    ds = SquadJSON(path=str(SQUAD_DEV), seed=1, num_train=40, num_val=10, num_eval=30)
    splits = ds.splits()
    assert {k: len(_qas(v)) for k, v in splits.items()} == {"train": 40, "validation": 10, "test": 30}
    assert_disjoint_articles(splits)
    for split in splits.values():
        assert_stratified(split, source)
    assert ds.skipped == 0
    assert json.dumps(ds.splits()) == json.dumps(splits)


# --- SquadV2: the official files, local, absent, or downloaded ----------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("LAFFI_OFFLINE", "1")


@pytest.fixture
def online(monkeypatch):
    for key in ("LAFFI_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", "*")


def test_offline_and_absent_is_one_error_naming_the_file_and_folder(tmp_path, offline):
    folder, cache = tmp_path / "squad", tmp_path / "cache"
    folder.mkdir()
    ds = SquadV2(path=str(folder), cache_dir=str(cache))
    with pytest.raises(ConfigError) as err:
        ds.check()
    message = str(err.value)
    assert DEV_FILE in message and str(folder / DEV_FILE) in message and str(cache) in message
    assert "LAFFI_OFFLINE=1" in message and "\n" not in message
    # without the train file, split_by=file cannot work offline (auto falls back to the article split)
    write(folder / DEV_FILE, make_squad(20, prefix="d"))
    SquadV2(path=str(folder), cache_dir=str(cache)).check()
    with pytest.raises(
        ConfigError, match=f"{TRAIN_FILE} is missing.*{_pattern(str(folder / TRAIN_FILE))}.*split_by=article"
    ):
        SquadV2(path=str(folder), cache_dir=str(cache), split_by="file").check()
    assert not cache.exists()  # nothing was attempted


def test_without_the_train_file_the_dev_file_is_split_by_article(tmp_path, offline):
    dev = make_squad(50, prefix="d")
    write(tmp_path / DEV_FILE, dev)
    ds = SquadV2(path=str(tmp_path), cache_dir=str(tmp_path / "cache"), seed=2, num_train=50, num_val=15, num_eval=30)
    ds.check()
    splits = ds.splits()
    assert ds.split_by_used == "article" and ds.files == [str(tmp_path / DEV_FILE)]
    assert {k: len(_qas(v)) for k, v in splits.items()} == {"train": 50, "validation": 15, "test": 30}
    assert_disjoint_articles(splits)
    for split in splits.values():
        assert_stratified(split, dev)
    # the same file read through SquadJSON gives the same split: one implementation
    same = SquadJSON(path=str(tmp_path / DEV_FILE), seed=2, num_train=50, num_val=15, num_eval=30)
    assert same.splits() == splits and same.chosen_ids() == ds.chosen_ids()


def test_with_both_files_train_comes_from_train_and_test_from_dev(tmp_path, offline):
    train, dev = make_squad(60, prefix="t"), make_squad(30, prefix="d")
    write(tmp_path / TRAIN_FILE, train)
    write(tmp_path / "cache" / DEV_FILE, dev)  # a file may also sit in the cache folder
    ds = SquadV2(path=str(tmp_path), cache_dir=str(tmp_path / "cache"), num_train=50, num_val=20, num_eval=40)
    ds.check()
    splits = ds.splits()
    assert ds.split_by_used == "file"
    ids = ds.chosen_ids()
    assert all(i.startswith("t") for i in ids["train"] + ids["validation"]) and all(
        i.startswith("d") for i in ids["test"]
    )
    assert_disjoint_articles(splits)
    assert_stratified(splits["train"], train)
    assert_stratified(splits["validation"], train)
    assert_stratified(splits["test"], dev)
    forced = SquadV2(
        path=str(tmp_path), cache_dir=str(tmp_path / "cache"), split_by="article", num_train=50, num_val=20, num_eval=40
    )
    forced.splits()
    assert forced.split_by_used == "article" and all(i.startswith("d") for v in forced.chosen_ids().values() for i in v)


@needs(SQUAD_DEV)
def test_squad_v2_on_the_shared_dev_file_offline(tmp_path, offline):
    ds = SquadV2(path=str(SQUAD_DEV.parent), cache_dir=str(tmp_path), seed=0, num_train=100, num_val=50, num_eval=200)
    ds.check()
    splits = ds.splits()
    assert ds.split_by_used == "article" and ds.skipped == 0
    assert_disjoint_articles(splits)
    for name, split in splits.items():
        n = len(_qas(split))
        assert n == ds.sizes[name]
        assert abs(_unanswerable(split) - n * 5945 / 11873) <= 1


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("dataset.path=/nonexistent", r"dataset\.path: '/nonexistent' is not a folder"),
        ("dataset.split_by=paragraph", r"dataset\.split_by"),
        ("dataset.num_val=0", r"dataset\.num_val"),
        ("dataset.download_timeout=0", r"dataset\.download_timeout"),
        ("dataset.on_bad_answer=fix", r"dataset\.on_bad_answer"),
    ],
)
def test_cli_style_bad_settings_fail_in_check(make_cfg, override, needle):
    cfg = make_cfg("dataset=squad_v2", override)

    def validate_and_check():
        validate(cfg)
        instantiate(cfg.dataset).check()

    with pytest.raises(ConfigError, match=needle):  # in the config's validation or the dataset's check
        validate_and_check()


def test_composed_default_reads_the_cache_folder(make_cfg, cache_dir, offline):
    cfg = make_cfg("dataset=squad_v2")
    validate(cfg)
    dataset = instantiate(cfg.dataset)
    assert isinstance(dataset, SquadV2) and dataset.cache_dir == str(cache_dir / "squad_v2")
    assert dataset.base_url.startswith("https://rajpurkar.github.io/SQuAD-explorer/dataset")
    with pytest.raises(ConfigError, match=f"{DEV_FILE} is missing.*{_pattern(str(cache_dir / 'squad_v2'))}"):
        dataset.check()


class _Server:
    """A local HTTP server: ``routes`` maps a path to (behaviour, body); behaviours: ok, die (the
    connection closes half-way through the body), stall (no response), missing (404)."""

    def __init__(self):
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                behaviour, body = server.routes.get(self.path, ("missing", b""))
                if behaviour == "stall":
                    server.release.wait(30)
                    return
                if behaviour == "missing":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if behaviour == "ok" else body[: len(body) // 2])
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_an_absent_train_file_is_downloaded_into_the_cache(tmp_path, online, server):
    train = make_squad(40, prefix="t")
    body = json.dumps(train).encode()
    server.routes["/files/" + TRAIN_FILE] = ("ok", body)
    write(tmp_path / "squad" / DEV_FILE, make_squad(20, prefix="d"))
    cache = tmp_path / "cache"
    settings = dict(
        path=str(tmp_path / "squad"), cache_dir=str(cache), base_url=server.url, num_train=30, num_val=10, num_eval=20
    )
    ds = SquadV2(**settings)
    ds.check()
    splits = ds.splits()
    assert server.requests == ["/files/" + TRAIN_FILE]
    assert ds.split_by_used == "file" and ds.files == [str(tmp_path / "squad" / DEV_FILE), str(cache / TRAIN_FILE)]
    assert (cache / TRAIN_FILE).read_bytes() == body
    assert sorted(p.name for p in cache.iterdir()) == [TRAIN_FILE]  # no temp file left
    assert all(i.startswith("t") for i in ds.chosen_ids()["train"])
    # the second time it is read from the cache: no request
    again = SquadV2(**settings)
    assert again.splits() == splits and len(server.requests) == 1


def test_a_transfer_cut_short_leaves_no_file(tmp_path, online, server):
    server.routes["/files/" + DEV_FILE] = ("die", json.dumps(make_squad(200, prefix="d")).encode())
    cache = tmp_path / "cache"
    ds = SquadV2(cache_dir=str(cache), base_url=server.url, split_by="article")
    ds.check()
    with pytest.raises(
        ConfigError, match=f"{DEV_FILE} is missing.*download from {server.url}{DEV_FILE} failed.*closed after"
    ):
        ds.splits()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_dead_server_fails_fast_and_a_404_is_clear(tmp_path, online, server):
    server.routes["/files/" + DEV_FILE] = ("stall", b"")
    ds = SquadV2(cache_dir=str(tmp_path / "cache"), base_url=server.url, split_by="article", download_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"{DEV_FILE} is missing.*failed.*timed out"):
        ds.splits()
    assert time.monotonic() - started < 10
    # auto mode online: the train file is required when it can be downloaded; a failure says how to do without it
    write(tmp_path / "squad" / DEV_FILE, make_squad(20, prefix="d"))
    ds = SquadV2(path=str(tmp_path / "squad"), cache_dir=str(tmp_path / "cache"), base_url=server.url)
    with pytest.raises(ConfigError, match=f"{TRAIN_FILE} is missing.*404.*split_by=article"):
        ds.splits()
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_a_download_that_is_not_json_is_refused(tmp_path, online, server):
    server.routes["/files/" + DEV_FILE] = ("ok", b"<html>not json</html>")
    ds = SquadV2(cache_dir=str(tmp_path / "cache"), base_url=server.url, split_by="article")
    with pytest.raises(ConfigError, match="failed.*JSONDecodeError"):
        ds.splits()
    assert not (tmp_path / "cache" / DEV_FILE).exists()
