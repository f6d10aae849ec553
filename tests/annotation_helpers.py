"""For the annotation app's tests: a small exported batch (written by the real ``export_batch``), and a
real server started as a user starts it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from laffi_exp.core.records import Answer, QAExample
from laffi_exp.feedback.human import export_batch


def _example(i: int) -> QAExample:
    context = f"Passage {i} is about a painter. Ann{i} painted it in Oslo.\nA second line, with a comma."
    answers = (f"Ann{i}",) if i % 4 else ()
    return QAExample(
        f"q{i}", "t", context, f"Who painted picture {i}?", answers, (context.find("Ann"),) if answers else ()
    )


EXAMPLES = [_example(i) for i in range(12)]
# The model's answers: right on odd ids, "Oslo" (in the passage) or no answer on even ones.
PREDICTIONS = {ex.id: ex.gold if i % 2 else ("" if i % 6 == 0 else "Oslo") for i, ex in enumerate(EXAMPLES)}
ANSWERS = [Answer(ex.id, ex.question, PREDICTIONS[ex.id], "") for ex in EXAMPLES]
IDS = [ex.id for ex in EXAMPLES]
ROOT = Path(__file__).resolve().parents[1]


def make_batch(folder: Path, ids=IDS, include_gold: bool = False, name: str = "batch") -> Path:
    jsonl, _ = export_batch(EXAMPLES, ANSWERS, ids, folder / name, include_gold=include_gold)
    return jsonl


def serve(batch: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``python -m laffi_exp.annotate serve BATCH --port 0 ...`` in its own process, and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "laffi_exp.annotate", "serve", str(batch), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # any folder: the paths are absolute
    )
    for line in proc.stdout:  # the URL is printed before it serves
        match = re.search(r"open (http://\S+)", line)
        if match:
            return proc, match.group(1)
    raise AssertionError(f"serve printed no URL: {proc.stderr.read()[-2000:]}")


def call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    """One JSON request: the status and the body, errors included."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
