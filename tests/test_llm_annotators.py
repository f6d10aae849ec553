"""The LLM annotators and their response cache: the openai annotator against a chat-completions server
started here on 127.0.0.1 (scripted failures, slowness, a killed pass), hf_fewshot with a tiny model
built here and with a real one from shared/ where present, and the annotator config files."""

from __future__ import annotations

import json
import logging
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hydra.utils import instantiate

from laffi_exp.core.config import CONF_DIR, validate
from laffi_exp.core.errors import AnnotationError, ConfigError
from laffi_exp.core.records import QAExample
from laffi_exp.feedback.hf_fewshot import HFFewShotAnnotator
from laffi_exp.feedback.llm import CACHE_FILE, FewShotPrompt, Request, Shot, extract_feedback, select_shots
from laffi_exp.feedback.openai_chat import OpenAIAnnotator
from laffi_exp.feedback.response_cache import ResponseCache

from .conftest import TINYLLAMA, needs

SECRET = "sk-test-DO-NOT-LEAK-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


def examples(n: int) -> list[QAExample]:
    """Questions on short passages; every fourth one is unanswerable."""
    out = []
    for i in range(n):
        context = f"Item {i} is kept in room {100 + i}. The room is on floor {i % 3}."
        answer = f"room {100 + i}"
        answerable = i % 4 != 0
        out.append(
            QAExample(
                id=f"q{i}",
                title="t",
                context=context,
                question=f"Where is item {i} kept?",
                answers=(answer,) if answerable else (),
                answer_starts=(context.index(answer),) if answerable else (),
            )
        )
    return out


def items(n: int) -> list[tuple[QAExample, str]]:
    return [(ex, f"room {100 + i}" if i % 2 else "") for i, ex in enumerate(examples(n))]


def expected(ex: QAExample) -> str:
    """What the fake server answers for ``ex``'s prompt (see ChatServer.content)."""
    return f'Incorrect. The answer is "{ex.question}".'


class ChatServer:
    """A chat-completions server on 127.0.0.1 (ephemeral port): ``POST /v1/chat/completions`` and
    ``GET /v1/models``. ``script`` lists what the next POSTs get, in order: "429", "500", "503", "404",
    "401", "hang" (answers after the client timed out), "not_json", "no_choices", "empty", "ok"; after
    the script, success. An error status is sent with ``Retry-After: retry_after`` (seconds; a short
    one keeps the client's waits short), or with the value after an "@" ("429@1"). ``delay`` slows
    every answer; with ``hold_after`` set, requests after that many wait until ``release()`` and are
    then dropped unanswered. ``times`` holds when each POST arrived."""

    def __init__(
        self,
        script=(),
        delay: float = 0.0,
        hang_s: float = 1.5,
        hold_after: int | None = None,
        retry_after: str = "0.01",
    ):
        self.script = list(script)
        self.retry_after = retry_after
        self.times: list[float] = []
        self.delay = delay
        self.hang_s = hang_s
        self.hold_after = hold_after
        self.lock = threading.Lock()
        self.released = threading.Event()
        self.posts = 0  # chat requests received
        self.admitted = 0  # chat requests not held
        self.gets = 0
        self.answered: dict[str, int] = {}  # question -> successful answers sent
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                with server.lock:
                    server.gets += 1
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": "test-model", "object": "model", "created": 0, "owned_by": "t"}],
                    },
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.posts += 1
                    server.times.append(time.monotonic())
                    server.auth.add(self.headers.get("Authorization", ""))
                    action = server.script.pop(0) if server.script else "ok"
                    held = server.hold_after is not None and server.admitted >= server.hold_after
                    server.admitted += not held
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if held:
                        server.released.wait(30)
                        return  # dropped: never answered
                    time.sleep(server.delay)
                finally:
                    with server.lock:  # before the answer: a client sees it only once this request is counted out
                        server.in_flight -= 1
                self._act(action, body)

            def _act(self, action, body):
                action, _, wait = action.partition("@")
                if action in ("429", "500", "503", "404"):
                    headers = {"Retry-After": wait or server.retry_after}
                    self._json(int(action), {"error": {"message": f"scripted {action}", "type": "test"}}, headers)
                elif action == "401":  # a server that echoes the key it was sent
                    self._json(
                        401, {"error": {"message": f"bad key {self.headers.get('Authorization')}", "type": "auth"}}
                    )
                elif action == "hang":
                    time.sleep(server.hang_s)
                elif action == "not_json":
                    self._raw(200, b"{this is not json")
                elif action == "no_choices":
                    self._json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m"})
                else:
                    question = server.question(body)
                    content = "" if action == "empty" else server.content(question)
                    self._json(
                        200,
                        {
                            "id": "x",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content},
                                }
                            ],
                        },
                    )
                    if action != "empty":
                        with server.lock:
                            server.answered[question] = server.answered.get(question, 0) + 1

            def _json(self, status, obj, headers=None):
                self._raw(status, json.dumps(obj).encode(), headers)

            def _raw(self, status, data, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that timed out and left
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()

    @staticmethod
    def question(body) -> str:
        prompt = body["messages"][-1]["content"]
        return [line for line in prompt.splitlines() if line.startswith("Question: ")][-1][len("Question: ") :]

    @staticmethod
    def content(question: str) -> str:
        return f'Feedback: Incorrect. The answer is "{question}".\nA second line that is not feedback.'

    def release(self):
        """Drop the held requests; answer all later ones."""
        with self.lock:
            self.hold_after = None
        self.released.set()

    def close(self):
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def _start(**kwargs) -> ChatServer:
        servers.append(ChatServer(**kwargs))
        return servers[-1]

    yield _start
    for s in servers:
        s.close()


def openai_annotator(url: str, cache_dir, **kwargs) -> OpenAIAnnotator:
    options = dict(model="test-model", k=2, max_retries=7, timeout=0.5)
    return OpenAIAnnotator(url, cache_dir=cache_dir, **{**options, **kwargs})


SHOTS = [
    (ex, "room 999", f'Incorrect. The answer is "{ex.gold}".')
    if ex.answers
    else (ex, "", "Correct. The question cannot be answered.")
    for ex in examples(40)[30:]
]


# -- the openai annotator -------------------------------------------------------------------------------
def test_feedback_comes_back_in_order_and_is_the_first_line(server, tmp_path):
    srv = server(delay=0.01)
    annotator = openai_annotator(srv.url, tmp_path, max_concurrency=4)
    annotator.prepare(SHOTS)
    batch = items(12)
    assert annotator.annotate_many(batch, progress=False) == [expected(ex) for ex, _ in batch]
    assert annotator.annotate(*batch[3]) == expected(batch[3][0])  # cached: no new request
    assert srv.posts == 12 and annotator.name == "openai:test-model" and annotator.source == "synthetic"


def test_a_429_is_retried_after_the_wait_its_retry_after_asks_for(server, tmp_path):
    srv = server(script=["429@1"])  # without the header the client would wait ~0.5 s
    ex, prediction = items(1)[0]
    assert openai_annotator(srv.url, tmp_path, max_concurrency=1).annotate(ex, prediction) == expected(ex)
    assert srv.posts == 2 and srv.times[1] - srv.times[0] >= 0.95


def test_transient_failures_are_retried_until_success(server, tmp_path):
    # hang first: a timeout has no Retry-After, so the client backs off (0.5 s for a first retry)
    srv = server(script=["hang", "429", "500", "503", "not_json", "no_choices", "empty"], hang_s=1.0)
    annotator = openai_annotator(srv.url, tmp_path, max_concurrency=1)
    ex, prediction = items(1)[0]
    start = time.monotonic()
    assert annotator.annotate(ex, prediction) == expected(ex)
    assert srv.posts == 8 and time.monotonic() - start < 4


@pytest.mark.parametrize(
    ("script", "last"),
    [
        (["500"] * 10, "HTTP 500: scripted 500"),
        (["429"] * 10, "HTTP 429: scripted 429"),
        (["500", "empty", "empty", "ok"], "malformed response: empty message content"),  # one budget for both
    ],
)
def test_retries_are_bounded_and_the_error_names_the_endpoint(server, tmp_path, script, last):
    srv = server(script=script)
    annotator = openai_annotator(srv.url, tmp_path, max_retries=2, max_concurrency=1)
    endpoint = re.escape(f"openai:test-model: {srv.url}/chat/completions")
    with pytest.raises(AnnotationError, match=rf"^{endpoint} failed 3 times; last: {re.escape(last)}$"):
        annotator.annotate_many(items(1), progress=False)
    assert srv.posts == 3


def test_timeouts_are_retried_and_bounded(server, tmp_path):
    srv = server(script=["hang"] * 5, hang_s=1.0)
    annotator = openai_annotator(srv.url, tmp_path, max_retries=1, timeout=0.3)
    timed_out = r"/chat/completions failed 2 times; last: no answer within 0\.3 s \(timeout\)"
    with pytest.raises(AnnotationError, match=timed_out):
        annotator.annotate_many(items(1), progress=False)
    assert srv.posts == 2


def test_a_retry_after_beyond_what_the_client_waits_fails_at_once(server, tmp_path):
    srv = server(script=["429@300"])
    start = time.monotonic()
    with pytest.raises(AnnotationError, match=r"failed once; last: HTTP 429: .*Retry-After asks for 300 s"):
        openai_annotator(srv.url, tmp_path).annotate_many(items(1), progress=False)
    assert srv.posts == 1 and time.monotonic() - start < 5


def test_with_no_retries_a_failure_is_final(server, tmp_path):
    srv = server(script=["503"])
    with pytest.raises(AnnotationError, match=r"failed once; last: HTTP 503"):
        openai_annotator(srv.url, tmp_path, max_retries=0).annotate_many(items(1), progress=False)
    assert srv.posts == 1


def test_a_client_error_is_not_retried(server, tmp_path):
    srv = server(script=["404"])
    with pytest.raises(AnnotationError, match="answered HTTP 404: .*scripted 404"):
        openai_annotator(srv.url, tmp_path).annotate_many(items(1), progress=False)
    assert srv.posts == 1


def test_an_unreachable_endpoint_fails_fast_naming_the_url(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    annotator = openai_annotator(url, tmp_path)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"feedback\.synthetic\.base_url={url}: cannot connect"):
        annotator.check()
    with pytest.raises(ConfigError, match="cannot connect"):
        annotator.annotate_many(items(2), progress=False)
    assert time.monotonic() - start < 5


def test_the_openai_api_needs_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"api_key_env: \$OPENAI_API_KEY is not set"):
        OpenAIAnnotator("https://api.openai.com/v1", "gpt-4o-mini", cache_dir=tmp_path).check()


def test_the_api_key_is_sent_but_never_cached_nor_logged(server, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("LAFFI_TEST_KEY", SECRET)
    srv = server(script=["500"])
    caplog.set_level(logging.DEBUG)  # the openai and http client libraries' debug logs too
    annotator = openai_annotator(srv.url, tmp_path, api_key_env="LAFFI_TEST_KEY")
    annotator.prepare(SHOTS)
    annotator.annotate_many(items(6), progress=False)
    assert srv.auth == {f"Bearer {SECRET}"}
    refused = server(script=["401"])  # a server that echoes the key in its error message
    with pytest.raises(AnnotationError) as err:
        openai_annotator(refused.url, tmp_path, api_key_env="LAFFI_TEST_KEY").annotate_many(items(1), progress=False)
    assert "HTTP 401" in str(err.value) and SECRET not in str(err.value)
    annotator.cache.close()
    stored = b"".join(p.read_bytes() for p in (tmp_path / CACHE_FILE).parent.iterdir())
    assert len(stored) > 0 and SECRET.encode() not in stored
    assert "Sending HTTP Request" in caplog.text  # the client libraries' debug logs were captured
    assert SECRET not in caplog.text
    out, errors = capfd.readouterr()
    assert SECRET not in out + errors


def test_concurrency_is_bounded(server, tmp_path):
    srv = server(delay=0.25, script=["429", "500"])  # a request being retried keeps its place
    openai_annotator(srv.url, tmp_path, max_concurrency=3).annotate_many(items(12), progress=False)
    assert srv.max_in_flight == 3 and srv.posts == 14


def test_a_failure_stops_the_pass_and_keeps_what_was_done(server, tmp_path):
    srv = server(delay=0.2, script=["ok", "ok", "404"])
    annotator = openai_annotator(srv.url, tmp_path, max_concurrency=2)
    start = time.monotonic()
    with pytest.raises(AnnotationError, match="answered HTTP 404"):
        annotator.annotate_many(items(20), progress=False)
    assert time.monotonic() - start < 2 and srv.posts <= 5  # the others were never sent
    assert len(annotator.cache) >= 2  # the answers that came back are kept


def test_a_second_pass_is_served_from_the_cache(server, tmp_path):
    srv = server()
    batch = items(10)
    first = openai_annotator(srv.url, tmp_path).annotate_many(batch, progress=False)
    srv.posts = srv.gets = 0
    second = openai_annotator(srv.url, tmp_path)
    assert second.annotate_many(batch, progress=False) == first
    assert srv.posts == 0 and srv.gets == 0


def test_cache_keys_follow_every_input(server, tmp_path):
    srv = server()
    batch = items(3)

    def annotate(**changed):
        annotator = openai_annotator(srv.url, tmp_path, **changed)
        annotator.prepare(SHOTS)
        annotator.annotate_many(batch, progress=False)

    annotate()
    for changed in (dict(temperature=0.7), dict(max_tokens=20), dict(k=1), dict(show_gold=False)):
        before = srv.posts
        annotate(**changed)
        assert srv.posts == before + 3, changed
    assert len(ResponseCache(tmp_path / CACHE_FILE)) == 15


KILLED_PASS = """
import sys
from laffi_exp.feedback.openai_chat import OpenAIAnnotator
from tests.test_llm_annotators import SHOTS, items
annotator = OpenAIAnnotator(sys.argv[1], "test-model", k=2, max_concurrency=2, timeout=60, cache_dir=sys.argv[2])
annotator.prepare(SHOTS)
annotator.annotate_many(items(12), progress=False)
print("finished")
"""


@pytest.mark.slow
def test_a_killed_pass_rerun_finishes_with_one_answer_per_example(server, tmp_path):
    srv = server(delay=0.05, hold_after=5)  # after 5 answers, requests hang (and are never answered)
    cache = ResponseCache(tmp_path / CACHE_FILE)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PASS, srv.url, str(tmp_path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(cache) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the pass ended before it could be killed"
        assert len(cache) == 5
    finally:
        proc.kill()
        proc.wait()
    srv.release()
    assert sum(srv.answered.values()) == 5
    annotator = openai_annotator(srv.url, tmp_path, k=2, max_concurrency=2)
    annotator.prepare(SHOTS)
    batch = items(12)
    assert annotator.annotate_many(batch, progress=False) == [expected(ex) for ex, _ in batch]
    assert srv.answered == {ex.question: 1 for ex, _ in batch}  # every example answered once, in all
    assert len(cache) == 12


WRITER = """
import sys
from laffi_exp.feedback.response_cache import ResponseCache
cache = ResponseCache(sys.argv[1])
for i in range(300):
    key = cache.key(kind="test", i=i)  # both writers store the same keys, racing
    assert cache.put(key, f"response {i}", "writer " + sys.argv[2]) == f"response {i}"
    cache.put(cache.key(kind="test", writer=sys.argv[2], i=i), "own")
"""


@pytest.mark.slow
def test_two_processes_share_one_cache_file(tmp_path):
    path = tmp_path / "shared" / "responses.sqlite"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n)], cwd=ROOT) for n in (1, 2)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    cache = ResponseCache(path)
    assert len(cache) == 900
    assert all(cache.get(cache.key(kind="test", i=i)) == f"response {i}" for i in range(300))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cache_keys_refuse_secrets_and_are_canonical(tmp_path):
    assert ResponseCache.key(a=1, b="x") == ResponseCache.key(b="x", a=1) != ResponseCache.key(a=2, b="x")
    with pytest.raises(ValueError, match="api_key"):
        ResponseCache.key(model="m", api_key=SECRET)
    cache = ResponseCache(None)
    assert cache.get("k") is None and len(cache) == 0
    assert cache.put("k", "first") == "first" and cache.put("k", "second") == "first"  # the first one stays
    assert "k" in cache and len(cache) == 1


# -- prompts and shots ---------------------------------------------------------------------------------
def test_prompt_shows_shots_gold_and_prediction():
    prompt = FewShotPrompt()
    ex, unanswerable = examples(2)[1], examples(1)[0]
    shots = [
        Shot("Passage A.", "Q A?", "x", 'Incorrect. The answer is "A".', ("A",)),
        Shot("P.", "Q?", "", "Correct.", None),
    ]
    text = prompt.render(ex, "room 5", shots)
    assert text.index("Passage A.") < text.index('Feedback: Incorrect. The answer is "A".') < text.index(ex.context)
    assert 'Reference answer: "room 101"\nAnswer: room 5\nFeedback:' in text and text.endswith("Feedback:")
    assert "Question: Q?\nAnswer: unanswerable\nFeedback: Correct." in text  # no gold known for that shot
    assert "Reference answer: none" in prompt.render(unanswerable, "", [])
    assert "Reference answer" not in FewShotPrompt(show_gold=False).render(ex, "room 5", shots)
    with pytest.raises(ConfigError, match=r"feedback\.synthetic\.template: bad placeholder .*answer"):
        FewShotPrompt(template="{shots}{answer}")


def test_shot_selection_is_deterministic_nested_and_order_free():
    pool = [Shot(f"c{i}", f"q{i}", "p", "f") for i in range(20)]
    four = select_shots(pool, 4, seed=0)
    assert four == select_shots(list(reversed(pool)), 4, seed=0)
    assert select_shots(pool, 2, seed=0) == four[:2]
    assert four != select_shots(pool, 4, seed=1)


def test_shots_from_a_file_or_none_with_a_warning(tmp_path, caplog):
    path = tmp_path / "shots.jsonl"
    rows = [
        {"context": f"c{i}", "question": f"q{i}", "prediction": "p", "feedback": "Correct.", "answers": ["p"]}
        for i in range(5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    annotator = OpenAIAnnotator("http://127.0.0.1:9/v1", "m", k=3, shots_path=str(path), cache_dir=tmp_path)
    annotator.prepare()
    assert len(annotator.shots) == 3 and all(s.answers == ("p",) for s in annotator.shots)
    annotator.prepare(SHOTS)  # human-annotated examples given: the file is not used
    assert {s.question for s in annotator.shots} <= {ex.question for ex, _, _ in SHOTS}
    with caplog.at_level(logging.WARNING):
        OpenAIAnnotator("http://127.0.0.1:9/v1", "m", cache_dir=tmp_path).prepare()
    assert "prompting zero-shot" in caplog.text
    path.write_text('{"context": "c", "question": "q"}\n')
    with pytest.raises(
        ConfigError, match=r"shots_path: .*shots.jsonl line 1: .*missing or not a string: prediction, feedback"
    ):
        OpenAIAnnotator("http://127.0.0.1:9/v1", "m", shots_path=str(path), cache_dir=tmp_path).prepare()


def test_feedback_is_the_first_line():
    assert extract_feedback("\n Feedback: Correct. Yes.\nMore.") == "Correct. Yes."
    assert extract_feedback('Incorrect. The answer is "X".') == 'Incorrect. The answer is "X".'
    assert extract_feedback("   ") == ""


# -- hf_fewshot -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised one-layer LLaMA with a small BPE tokenizer that has no pad token, saved
    as a model folder (a short window, 256 positions, so that long prompts must be fitted)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_annotator")
    texts = [FewShotPrompt().render(ex, "room 1", []) + " Correct. Incorrect. The answer is" for ex in examples(40)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_hf_fewshot_gives_one_deterministic_feedback_per_item_and_caches(tiny_model_dir, tmp_path):
    batch = items(7)
    one = HFFewShotAnnotator(str(tiny_model_dir), k=2, max_new_tokens=6, batch_size=3, cache_dir=tmp_path / "a")
    one.prepare(SHOTS)
    first = one.annotate_many(batch, progress=False)
    assert len(first) == 7 and all(isinstance(f, str) for f in first)
    assert one.name == f"hf_fewshot:{tiny_model_dir.name}" and one.source == "synthetic"
    other = HFFewShotAnnotator(str(tiny_model_dir), k=2, max_new_tokens=6, batch_size=7, cache_dir=tmp_path / "b")
    other.prepare(SHOTS)
    assert other.annotate_many(batch, progress=False) == first  # greedy: the same whatever the batching
    cached = HFFewShotAnnotator(str(tiny_model_dir), k=2, max_new_tokens=6, cache_dir=tmp_path / "a")
    cached.prepare(SHOTS)
    assert cached.annotate_many(batch, progress=False) == first
    assert cached._base is None  # everything from the cache: the model was never loaded
    assert cached.annotate(*batch[2]) == first[2]


def test_hf_fewshot_fits_long_prompts_into_the_window(tiny_model_dir, tmp_path):
    annotator = HFFewShotAnnotator(str(tiny_model_dir), k=3, max_new_tokens=8, cache_dir=tmp_path)
    annotator.prepare(SHOTS)
    base = annotator._load()
    assert base.tokenizer.pad_token is not None  # it had none
    budget = 256 - 8
    ex = examples(2)[1]
    long_ex = QAExample(
        "long", "t", "Filler words go here. " * 200 + ex.context, ex.question, ex.answers, (4400 + ex.answer_starts[0],)
    )
    assert long_ex.context[long_ex.answer_starts[0] :].startswith(ex.answers[0])
    fitted = {}
    for name, case in (("short", ex), ("long", long_ex)):
        prompt = annotator.prompt.render(case, "room 7", annotator.shots)
        fitted[name] = annotator._fit(Request("", prompt, case, "room 7"), base)
        assert len(base.tokenizer(fitted[name])["input_ids"]) <= budget
    assert fitted["short"].count("Feedback:") < 4  # some shots dropped
    assert fitted["long"].count("Feedback:") == 1 and ex.answers[0] in fitted["long"]  # cut around the answer
    assert len(annotator.annotate_many([(long_ex, "room 7"), (ex, "")], progress=False)) == 2


def test_hf_fewshot_names_its_own_keys_in_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^feedback\.synthetic\.name_or_path: .*no such folder"):
        HFFewShotAnnotator(str(tmp_path / "no_model"), cache_dir=tmp_path).check()
    with pytest.raises(ConfigError, match=r"feedback\.synthetic\.batch_size: expected an integer >= 1"):
        HFFewShotAnnotator(str(tmp_path), batch_size=0)


@needs(TINYLLAMA)
def test_hf_fewshot_with_a_real_model(tmp_path):
    annotator = HFFewShotAnnotator(str(TINYLLAMA), k=2, max_new_tokens=12, batch_size=4, cache_dir=tmp_path)
    annotator.check()
    annotator.prepare(SHOTS)
    batch = items(5)
    first = annotator.annotate_many(batch, progress=False)
    assert len(first) == 5 and all(isinstance(f, str) and "\n" not in f for f in first)
    assert any(first)  # a trained model writes something
    again = HFFewShotAnnotator(str(TINYLLAMA), k=2, max_new_tokens=12, batch_size=2, cache_dir=tmp_path / "fresh")
    again.prepare(SHOTS)
    assert again.annotate_many(batch, progress=False) == first


# -- config files ----------------------------------------------------------------------------------------
ANNOTATOR_OVERRIDES = {
    "rule_based": [],
    "openai": ["feedback.synthetic.model=my-model", "feedback.synthetic.k=2"],
    "hf_fewshot": [f"feedback.synthetic.name_or_path={TINYLLAMA}"],
}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "annotator").glob("*.yaml")))
def test_every_annotator_config_composes_and_instantiates(name, make_cfg, cache_dir, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    cfg = make_cfg(f"feedback/synthetic={name}", *ANNOTATOR_OVERRIDES[name])
    validate(cfg)
    annotator = instantiate(cfg.feedback.synthetic)
    assert annotator.source == "synthetic" and annotator.name
    if name == "openai":
        assert (
            annotator.base_url == "http://127.0.0.1:9/v1" and annotator.name == "openai:my-model" and annotator.k == 2
        )
    if name != "rule_based":
        assert annotator.cache.path == cache_dir / CACHE_FILE


def test_hf_fewshot_requires_a_model(make_cfg):
    with pytest.raises(ConfigError, match=r"feedback\.synthetic\.name_or_path: a value is required"):
        validate(make_cfg("feedback/synthetic=hf_fewshot"))


def test_openai_base_url_defaults_to_the_openai_api(make_cfg, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = make_cfg("feedback/synthetic=openai")
    assert (
        cfg.feedback.synthetic.base_url == "https://api.openai.com/v1" and cfg.feedback.synthetic.model == "gpt-4o-mini"
    )
