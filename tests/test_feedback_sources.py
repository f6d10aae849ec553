"""End to end with real feedback sources: answers exported for people, their filled-in file imported
as the human pool, an OpenAI-compatible LLM annotator (a local server) as the synthetic pool."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from laffi_exp.core.io import read_json, read_jsonl
from laffi_exp.core.records import QAExample
from laffi_exp.feedback.hybrid import human_ids
from laffi_exp.feedback.simulated import SimulatedHuman
from laffi_exp.pipeline import run

from .conftest import TINY
from .test_llm_annotators import server  # noqa: F401  (the local chat-completions server fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_export_then_a_real_human_file_plus_an_llm_annotator_trains(make_cfg, tmp_path, cache_dir, server):  # noqa: F811
    ratio = "feedback.human_ratio=0.3"
    tiny = [o for o in TINY if not o.startswith("logger=")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "laffi_exp.annotate",
            "export",
            "--out",
            str(tmp_path / "batch"),
            *tiny,
            "logger=csv",
            f"paths.cache_dir={cache_dir}",
            f"cache.dir={tmp_path / 'stages'}",
            f"paths.output_dir={tmp_path / 'export'}",
            ratio,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "batch.csv").open()))
    split_ids = json.loads((tmp_path / "export" / "chosen_ids.json").read_text())
    chosen = human_ids(split_ids["train"], 0.3, 0) | human_ids(split_ids["validation"], 0.3, 0)
    assert rows and {r["id"] for r in rows} == chosen  # exactly the human share of each split
    # People fill in the CSV (here: the simulated human's words, signed by two annotators).
    human = SimulatedHuman(seed=7)
    splits_answers = {r["id"]: r for r in rows}
    for i, r in enumerate(rows):
        ex = QAExample(r["id"], "", r["context"], r["question"], ())
        r["feedback"] = human.annotate(ex, "" if r["prediction"] == "unanswerable" else r["prediction"])
        r["annotator_id"] = f"person_{i % 2}"
    filled = tmp_path / "filled.csv"
    with filled.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    digest = hashlib.sha256(filled.read_bytes()).hexdigest()

    llm = server()
    metrics = run(
        make_cfg(
            ratio,
            "feedback/human=file",
            f"feedback.human.path={filled}",
            "feedback/synthetic=openai",
            f"feedback.synthetic.base_url={llm.url}",
            "feedback.synthetic.model=test-model",
            f"cache.dir={tmp_path / 'stages'}",
        )
    )
    out = tmp_path / "run"
    feedback = list(read_jsonl(out / "feedback.jsonl"))
    by_source = {}
    for f in feedback:
        by_source.setdefault(f["source"], set()).add(f["annotator"])
    assert by_source["human"] == {"person_0", "person_1"}
    assert by_source["synthetic"] == {"openai:test-model"}
    human_rows = [f for f in feedback if f["source"] == "human"]
    assert all(f["feedback"] == splits_answers[f["id"]]["feedback"] for f in human_rows)
    assert metrics["feedback/human_fallback"] == 0
    assert 0.1 < metrics["feedback/human_share"] < 0.6
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report = read_json(out / "feedback_report.json")["train"]
    assert report["sources"]["human"]["count"] == len(human_rows)
    assert hashlib.sha256(filled.read_bytes()).hexdigest() == digest  # the imported file is never modified
    assert llm.posts == sum(llm.answered.values()) > 0
