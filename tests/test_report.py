"""The sweep report on a hand-made sweep dir: the numbers in every table checked against values worked
out by hand, the figure, the command line and the Hydra callback."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from laffi_exp.report import main
from laffi_exp.runs.jobs import find_job_dirs
from laffi_exp.runs.paired import PAIRED_COLUMNS, question_scores
from laffi_exp.runs.report import RESULTS_LEAD, ReportCallback, build_report, summary_columns
from laffi_exp.scoring.squad_metrics import golds_from_dataset, score_examples
from laffi_exp.scoring.stats import bootstrap_ci, mean_std_ci, t_quantile_975

T1 = 12.7062047361747  # t(0.975, df=1): two seeds

EVAL_DATA = {
    "version": "v2.0",
    "data": [
        {
            "title": "Facts",
            "paragraphs": [
                {
                    "context": "Paris is the capital of France. The blue whale is the largest animal. It was 1990.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Capital of France?",
                            "answers": [{"text": "Paris", "answer_start": 0}],
                        },
                        {
                            "id": "q2",
                            "question": "Largest animal?",
                            "answers": [{"text": "blue whale", "answer_start": 36}],
                        },
                        {"id": "q3", "question": "Which year?", "answers": [{"text": "1990", "answer_start": 78}]},
                        {"id": "q4", "question": "Capital of Mars?", "answers": [], "is_impossible": True},
                    ],
                }
            ],
        }
    ],
}
# Per question (q1..q4) EM and F1, worked out by hand in the comments.
BASE_PREDS = {"q1": "London", "q2": "whale", "q3": "1990", "q4": "something"}  # EM 0 0 1 0, F1 0 2/3 1 0
SFT_PREDS = {"q1": "Paris", "q2": "the blue whale", "q3": "1991", "q4": ""}  # EM = F1 = 1 1 0 1
LAFFI_PREDS = {
    0: {"q1": "paris.", "q2": "whale", "q3": "1990", "q4": ""},  # EM 1 0 1 1, F1 1 2/3 1 1
    1: {"q1": "paris.", "q2": "whale", "q3": "1989", "q4": ""},  # EM 1 0 0 1, F1 1 2/3 0 1
}
REFLECT_PREDS = {"q1": "Paris", "q2": "blue whale", "q3": "1990", "q4": ""}  # all right

# test/exact of each run; the other metrics are fixed offsets from it (see _metrics).
LAFFI_EXACT = {(0.0, 0): 40.0, (0.0, 1): 50.0, (0.5, 0): 55.0, (0.5, 1): 61.0, (1.0, 0): 70.0, (1.0, 1): 66.0}
SFT_EXACT = {0: 60.0, 1: 64.0}
BASE_EXACT = {0: 20.0, 1: 30.0}  # the sft run of seed 1 reports 31.0 instead: a disagreeing base


def _metrics(exact: float, base: float, reflect: float | None) -> dict:
    metrics = {}
    for prefix, e in (("base", base), ("test", exact), ("test_reflect", reflect)):
        if e is not None:
            metrics |= {
                f"{prefix}/exact": e,
                f"{prefix}/f1": e + 5,
                f"{prefix}/HasAns_exact": e - 10,
                f"{prefix}/HasAns_f1": e - 4,
                f"{prefix}/NoAns_exact": e + 10,
                f"{prefix}/NoAns_f1": e + 10,
                f"{prefix}/total": 4,
            }
    return metrics | {"time/seconds": 12.5, "train/examples": 24}


def _config(method: str, ratio: float, seed: int) -> dict:
    return {"seed": seed, "method": {"name": method}, "feedback": {"human_ratio": ratio}}


def _job(root: Path, name: str, config: dict, metrics: dict | None, preds: dict[str, dict]) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (job / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
        (job / "eval_data.json").write_text(json.dumps(EVAL_DATA))
        for file, p in preds.items():
            (job / file).write_text(json.dumps(p))


def make_sweep(root: Path, with_sft: bool = True) -> Path:
    """Jobs 0-5: laffi at ratios 0/0.5/1 x seeds 0/1; method=sft/0-1: sft (nested, as with a Hydra
    subdir); 6: crashed (config, no metrics)."""
    for num, ((ratio, seed), exact) in enumerate(LAFFI_EXACT.items()):
        preds = {
            "predictions.json": LAFFI_PREDS[seed],
            "reflect_predictions.json": REFLECT_PREDS,
            "base_predictions.json": BASE_PREDS,
        }
        metrics = _metrics(exact, BASE_EXACT[seed], exact + 2) | {"feedback/human_share": ratio}
        _job(root, str(num), _config("laffi", ratio, seed), metrics, preds)
    # Job 3 (ratio 0.5, seed 1) has only Hydra's own config, with an interpolation that cannot resolve
    # outside Hydra; job 0's resolved config.yaml wins over a stale .hydra/config.yaml.
    (root / "3" / "config.yaml").unlink()
    (root / "3" / ".hydra" / "config.yaml").write_text(
        "seed: 1\nmethod:\n  name: laffi\nfeedback:\n  human_ratio: ${ratio}\nratio: 0.5\n"
        "paths:\n  output_dir: ${hydra:runtime.output_dir}\n"
    )
    (root / "0" / ".hydra" / "config.yaml").write_text("seed: 99\nmethod:\n  name: sft\n")
    if with_sft:
        for seed, exact in SFT_EXACT.items():
            base = 31.0 if seed == 1 else BASE_EXACT[seed]
            preds = {"predictions.json": SFT_PREDS, "base_predictions.json": BASE_PREDS}
            _job(root, f"method=sft/{seed}", _config("sft", 0.5, seed), _metrics(exact, base, None), preds)
    _job(root, "6", _config("laffi", 1.0, 1), None, {})
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return build_report(make_sweep(tmp_path_factory.mktemp("sweep")))


def test_jobs_found_at_any_depth_in_natural_order_and_not_inside_a_job(tmp_path):
    for name in ("2", "10", "sub/1"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
    (tmp_path / "2" / "adapter").mkdir()
    (tmp_path / "2" / "adapter" / "metrics.json").write_text("{}")
    (tmp_path / "other").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in find_job_dirs(tmp_path)] == ["2", "10", "sub/1"]


def test_results_csv_has_one_row_per_run_and_every_metric(report):
    with open(report.out_dir / "results.csv", newline="") as f:
        columns = next(csv.reader(f))
    rows = read_csv(report.out_dir / "results.csv")
    metric_keys = sorted((set(_metrics(1, 1, 1)) | {"feedback/human_share"}) - {"time/seconds"})
    assert columns == RESULTS_LEAD + metric_keys
    assert columns[:6] == ["job", "method", "human_ratio", "seed", "status", "time/seconds"]
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "4", "5", "6", "method=sft/0", "method=sft/1"]
    by_job = {r["job"]: r for r in rows}
    assert (by_job["0"]["method"], by_job["0"]["seed"], by_job["0"]["human_ratio"]) == ("laffi", "0", "0.0")
    assert (by_job["3"]["seed"], by_job["3"]["human_ratio"]) == ("1", "0.5")  # from .hydra/config.yaml
    assert float(by_job["3"]["test/exact"]) == 61.0 and float(by_job["3"]["time/seconds"]) == 12.5
    assert by_job["6"]["status"] == "missing" and by_job["6"]["test/exact"] == ""
    assert by_job["method=sft/1"]["human_ratio"] == "" and by_job["method=sft/1"]["test_reflect/exact"] == ""
    assert by_job["method=sft/1"]["base/exact"] == "31.0"


def test_summary_means_std_and_t_intervals_over_seeds(report):
    rows = read_csv(report.out_dir / "summary.csv")
    assert list(rows[0]) == summary_columns()
    keys = [(r["method"], r["human_ratio"], r["protocol"]) for r in rows]
    assert keys == [("base", "", "direct"), ("sft", "", "direct")] + [
        ("laffi", ratio, protocol) for ratio in ("0.0", "0.5", "1.0") for protocol in ("direct", "reflect")
    ]
    by_key = dict(zip(keys, rows))

    def check(row, metric, values):
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert row["n"] == "2" and row["seeds"] == "0 1"
        assert float(row[f"{metric}_mean"]) == pytest.approx(mean)
        assert float(row[f"{metric}_std"]) == pytest.approx(std)
        assert float(row[f"{metric}_ci95"]) == pytest.approx(T1 * std / math.sqrt(2), rel=1e-6)

    check(by_key[("laffi", "0.5", "direct")], "exact", [55.0, 61.0])
    check(by_key[("laffi", "0.5", "direct")], "f1", [60.0, 66.0])
    check(by_key[("laffi", "0.5", "direct")], "NoAns_exact", [65.0, 71.0])
    check(by_key[("laffi", "1.0", "reflect")], "exact", [72.0, 68.0])
    check(by_key[("sft", "", "direct")], "HasAns_f1", [56.0, 60.0])
    # base: one value per seed; seed 1's four runs (30, 30, 30, 31) are averaged, with a note.
    check(by_key[("base", "", "direct")], "exact", [20.0, 30.25])
    assert any("base" in n and "seed 1" in n and "different numbers" in n for n in report.notes)
    assert any("without metrics.json" in n and "6" in n for n in report.notes)


def test_one_seed_has_no_spread_and_t_table():
    assert mean_std_ci([42.0]) == (42.0, None, None)
    assert mean_std_ci([]) == (None, None, None)
    assert t_quantile_975(1) == pytest.approx(T1, rel=1e-6)
    assert t_quantile_975(30) == pytest.approx(2.0422725, rel=1e-6)
    assert 1.96 <= t_quantile_975(1000) < 1.963


def test_question_scores_follow_the_official_rules():
    golds = golds_from_dataset(EVAL_DATA["data"])
    for preds in (BASE_PREDS, SFT_PREDS, LAFFI_PREDS[0], {"q1": "Paris"}):  # the last misses q2-q4
        em, f1 = question_scores(golds, preds)
        official = score_examples(golds, preds)
        assert 100 * em.mean() == pytest.approx(official["exact"])
        assert 100 * f1.mean() == pytest.approx(official["f1"])
    em, f1 = question_scores(golds, BASE_PREDS)
    assert em.tolist() == [0, 0, 1, 0] and f1 == pytest.approx([0, 2 / 3, 1, 0])


def test_paired_differences_per_seed_and_pooled(report):
    rows = read_csv(report.out_dir / "paired.csv")
    assert list(rows[0]) == PAIRED_COLUMNS
    # 5 comparisons with a laffi side x 3 ratios + sft - base; each: seeds 0, 1 and pooled.
    assert len(rows) == (5 * 3 + 1) * 3
    get = {(r["system_a"], r["system_b"], r["human_ratio"], r["seed"]): r for r in rows}

    def diff(a, b, ratio, seed, exact, f1):
        row = get[(a, b, ratio, seed)]
        assert float(row["exact_diff"]) == pytest.approx(exact)
        assert float(row["f1_diff"]) == pytest.approx(f1)
        for m in ("exact", "f1"):
            assert float(row[f"{m}_ci_low"]) <= float(row[f"{m}_diff"]) <= float(row[f"{m}_ci_high"])
        return row

    # laffi - sft, per question EM: seed 0 (0, -1, 1, 0), seed 1 (0, -1, 0, 0); F1 -1/3 on q2 instead of -1.
    row = diff("laffi", "sft", "0.5", "0", 0.0, 100 * (2 / 3) / 4)
    assert (float(row["exact_a"]), float(row["exact_b"]), row["n_questions"]) == (75.0, 75.0, "4")
    diff("laffi", "sft", "0.5", "1", -25.0, 100 * (-1 / 3) / 4)
    pooled = diff("laffi", "sft", "0.5", "pooled", -12.5, 100 * (1 / 3) / 8)
    assert (pooled["n_seeds"], pooled["n_questions"]) == ("2", "4")
    diff("sft", "base", "", "0", 50.0, 100 * (1 + 1 / 3 - 1 + 1) / 4)
    diff("laffi", "base", "1.0", "1", 25.0, 100 * (1 + 0 - 1 + 1) / 4)
    diff("laffi_reflect", "laffi", "0.0", "pooled", 100 * 3 / 8, 100 * (1 / 3 + 1 / 3 + 1) / 8)
    diff("laffi_reflect", "sft", "0.0", "0", 25.0, 25.0)
    assert "## Paired differences" in report.markdown and "laffi − sft" in report.markdown


def test_report_is_deterministic(report, tmp_path):
    again = build_report(report.sweep_dir, tmp_path)
    for name in ("results.csv", "summary.csv", "paired.csv", "results.md"):
        assert (tmp_path / name).read_text() == (report.out_dir / name).read_text(), name
    assert again.paired == report.paired


def test_bootstrap_ci():
    low, high = bootstrap_ci(np.full(10, 0.5), np.ones(10))
    assert low == pytest.approx([0.5]) and high == pytest.approx([0.5])
    x = np.random.default_rng(1).normal(0.3, 1.0, size=400)
    low, high = bootstrap_ci(x, np.ones(400))
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert low[0] < x.mean() < high[0]
    assert (high[0] - low[0]) / 2 == pytest.approx(half, rel=0.15)
    # Clusters: two seeds scored on each question count as one resampling unit.
    sums, counts = np.stack([x[:200] + x[200:]], 1), np.full(200, 2.0)
    low, high = bootstrap_ci(sums, counts, resamples=500, seed=3)
    assert low[0] < x.mean() < high[0]


def test_ablation_png_and_markdown(report):
    png = report.out_dir / "ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(report.out_dir.glob(".*.tmp"))
    md = report.markdown
    assert (report.out_dir / "results.md").read_text() == md
    assert "| method | human share | protocol | EM | F1 | n |" in md
    assert f"| laffi | 50% | direct | 58.0 ± {T1 * statistics.stdev([55, 61]) / math.sqrt(2):.1f} |" in md
    assert "without (crashed or still running): 6" in md


def test_sweep_without_sft_has_no_paired_table(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", with_sft=False)
    result = build_report(sweep)
    assert result.paired == [] and not (sweep / "paired.csv").exists()
    assert (sweep / "ablation.png").is_file() and "Paired" not in result.markdown
    assert [r["method"] for r in result.summary] == ["base"] + ["laffi"] * 6


def test_cli_prints_the_table_and_writes_to_out(report, tmp_path, capsys, caplog):
    assert main([str(report.sweep_dir), "--out", str(tmp_path / "out")]) == 0
    assert "| laffi | 100% | reflect |" in (printed := capsys.readouterr().out) and "wrote:" in printed
    assert "without metrics.json" in caplog.text  # the crashed job, as a warning
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "results.csv",
        "summary.csv",
        "paired.csv",
        "ablation.png",
        "results.md",
    }


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "laffi_exp.report", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_bad_dir_is_one_clear_line(tmp_path):
    proc = run_cli(str(tmp_path / "nope"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "sweep dir not found" in proc.stderr and "nope" in proc.stderr
    _job(tmp_path / "crashed", "0", _config("laffi", 0.5, 0), None, {})
    assert main([str(tmp_path / "crashed")]) == 2


def test_callback_builds_the_report_and_never_raises(tmp_path, caplog):
    sweep = make_sweep(tmp_path / "sweep")
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert {"results.csv", "summary.csv", "paired.csv", "ablation.png", "results.md"} <= {
        p.name for p in sweep.iterdir()
    }
    assert "without metrics.json" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nope")}}}))
    assert "Sweep report FAILED" in caplog.text and "sweep dir not found" in caplog.text


APP = """
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path=".", config_name="app")
def app(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    exact = 50.0 + 10 * cfg.feedback.human_ratio + cfg.seed
    (out / "metrics.json").write_text(json.dumps({"test/exact": exact, "test/f1": exact, "base/exact": 20.0}))


app()
"""
APP_CONFIG = """
seed: 0
method: {name: laffi}
feedback: {human_ratio: 0.5}
hydra:
  sweep: {dir: SWEEP, subdir: "${hydra.job.num}"}
  callbacks:
    report:
      _target_: laffi_exp.runs.report.ReportCallback
"""


@pytest.mark.slow
def test_callback_hooked_into_a_real_hydra_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.yaml").write_text(APP_CONFIG.replace("SWEEP", str(sweep)))
    proc = subprocess.run(
        [sys.executable, "app.py", "-m", "feedback.human_ratio=0,1", "seed=0,1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["human_ratio"], r["protocol"]): r for r in read_csv(sweep / "summary.csv")}
    assert float(rows[("1.0", "direct")]["exact_mean"]) == 60.5 and rows[("1.0", "direct")]["n"] == "2"
    assert (sweep / "ablation.png").is_file() and "Sweep report" in proc.stderr + proc.stdout
