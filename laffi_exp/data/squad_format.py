"""The SQuAD JSON layout (v2.0 or v1.1): reading a file into ``QAExample`` records with schema checks that
name the file and the question id or JSON path, and downloading the official files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from http.client import HTTPException
from pathlib import Path

from laffi_exp.core.env import env_true
from laffi_exp.core.errors import ConfigError
from laffi_exp.core.io import atomic_write_text
from laffi_exp.core.records import QAExample

log = logging.getLogger(__name__)

# md5 of the official releases (the values torchtext publishes; dev measured in shared/data/squad_v2).
OFFICIAL_MD5 = {
    "dev-v2.0.json": "246adae8b7002f8679c027697b0b7cf8",
    "train-v2.0.json": "62108c273c268d70893182d5cf8df740",
}
OFFLINE_VARIABLES = ("LAFFI_OFFLINE", "HF_HUB_OFFLINE")


def load_squad_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (expected a SQuAD-layout JSON file)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _walk(squad: dict, source: str) -> Iterator[tuple[int, int, dict, str | None]]:
    """Yield ``(article index, paragraph index, qa, problem)`` for every question in file order, where
    ``problem`` says why its answers are unusable (None when they are fine). Raises ConfigError, naming
    ``source`` and the question id or JSON path, on anything that breaks the SQuAD layout."""
    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        raise ConfigError(f"{source}: expected a JSON object with a 'data' list (SQuAD layout)")
    seen: dict[str, str] = {}
    for a, article in enumerate(squad["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise ConfigError(f"{source}: data[{a}] has no 'paragraphs' list")
        for p, para in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                raise ConfigError(f"{source}: {where} has no 'context' string")
            if not isinstance(para.get("qas"), list):
                raise ConfigError(f"{source}: {where} has no 'qas' list")
            context = para["context"]
            for q, qa in enumerate(para["qas"]):
                at = f"{where}.qas[{q}]"
                qid = qa.get("id") if isinstance(qa, dict) else None
                if not isinstance(qid, str) or not qid:
                    raise ConfigError(f"{source}: {at}: a question has no 'id'")
                if qid in seen:
                    raise ConfigError(f"{source}: duplicate question id {qid!r} at {at} (first at {seen[qid]})")
                seen[qid] = at
                if not isinstance(qa.get("question"), str):
                    raise ConfigError(f"{source}: question {qid!r} ({at}) has no 'question' string")
                answers = qa.get("answers", [])
                if not isinstance(answers, list):
                    raise ConfigError(f"{source}: question {qid!r} ({at}): 'answers' is not a list")
                problem = None
                if not qa.get("is_impossible", False):
                    for ans in answers:
                        text = ans.get("text") if isinstance(ans, dict) else None
                        start = ans.get("answer_start") if isinstance(ans, dict) else None
                        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                            raise ConfigError(
                                f"{source}: question {qid!r} ({at}) has an answer without 'text'/'answer_start'"
                            )
                        if problem is None and context[start : start + len(text)] != text:
                            problem = f"answer_start {start} does not point at {text!r} in the context"
                    if not answers and qa.get("is_impossible") is False:
                        problem = "is_impossible is false but 'answers' is empty"
                yield a, p, qa, problem


def answers_of(qa: dict) -> list[dict]:
    """The gold answers of a question; [] when unanswerable (SQuAD 1.1: no is_impossible = answerable)."""
    return [] if qa.get("is_impossible", False) else qa.get("answers", [])


def examples_from_squad(squad: dict, source: str = "<data>") -> list[QAExample]:
    """Flatten a SQuAD JSON object into examples, in file order. Raises ConfigError on schema errors:
    missing keys, duplicate ids, or an ``answer_start`` that does not point at the answer text."""
    examples: list[QAExample] = []
    for a, p, qa, problem in _walk(squad, source):
        if problem:
            raise ConfigError(f"{source}: question {qa['id']!r}: {problem}")
        article, answers = squad["data"][a], answers_of(qa)
        examples.append(
            QAExample(
                id=qa["id"],
                title=str(article.get("title", f"article_{a}")),
                context=article["paragraphs"][p]["context"],
                question=qa["question"],
                answers=tuple(ans["text"] for ans in answers),
                answer_starts=tuple(ans["answer_start"] for ans in answers),
            )
        )
    return examples


def drop_bad_answers(squad: dict, source: str, on_bad_answer: str) -> tuple[dict, list[str]]:
    """Check the whole file; return it without the questions whose answers do not match their context
    (``on_bad_answer=skip``) and the ids of those questions, or raise on the first (``error``)."""
    bad: set[tuple[int, int, str]] = set()
    for a, p, qa, problem in _walk(squad, source):
        if problem and on_bad_answer == "error":
            raise ConfigError(
                f"{source}: question {qa['id']!r}: {problem} (dataset.on_bad_answer=skip drops such questions)"
            )
        if problem:
            bad.add((a, p, qa["id"]))
    if not bad:
        return squad, []
    data = []
    for a, article in enumerate(squad["data"]):
        paragraphs = [
            {**para, "qas": [qa for qa in para["qas"] if (a, p, qa["id"]) not in bad]}
            for p, para in enumerate(article["paragraphs"])
        ]
        data.append({**article, "paragraphs": paragraphs})
    return {**squad, "data": data}, [qid for _, _, qid in sorted(bad)]


def offline_settings() -> list[str]:
    """The environment settings that turn downloads off, e.g. ["LAFFI_OFFLINE=1"]; [] when online."""
    return [f"{k}={os.environ[k]}" for k in OFFLINE_VARIABLES if env_true(k)]


def offline() -> bool:
    return bool(offline_settings())


def download(url: str, destination: Path, timeout: float) -> dict:
    """Fetch a SQuAD JSON file from ``url`` into ``destination`` (atomically: nothing is written unless
    every byte arrived and parsed as JSON) and return it parsed. ``timeout`` (seconds) bounds the
    connection and every read, so a dead server fails fast. Raises OSError on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            chunks = []
            while chunk := response.read(1 << 20):
                chunks.append(chunk)
        body = b"".join(chunks)
        if expected is not None and expected.isdigit() and len(body) != int(expected):
            raise OSError(f"the connection closed after {len(body)} of {expected} bytes")
        text = body.decode("utf-8")
        squad = json.loads(text)
    except (HTTPException, UnicodeDecodeError, ValueError) as err:  # ValueError: bad URL, or JSON
        raise OSError(f"{type(err).__name__}: {err}") from err
    official, md5 = OFFICIAL_MD5.get(destination.name), hashlib.md5(body).hexdigest()
    if official and md5 != official:
        log.warning("%s: differs from the official release (md5 %s, official %s)", url, md5, official)
    atomic_write_text(destination, text)
    return squad
