"""The hybrid mix: which examples take human feedback, the records it writes, how batching
annotators are driven, the overlap kept for the report, and the export command."""

from __future__ import annotations

import csv
import itertools
import math
import subprocess
import sys

import pytest

from laffi_exp.annotate import main
from laffi_exp.core.records import Answer
from laffi_exp.data.squad_format import examples_from_squad
from laffi_exp.data.synthetic import generate
from laffi_exp.feedback.base import Annotator
from laffi_exp.feedback.hybrid import annotate, human_ids, human_ids_by_split, overlap_ids
from laffi_exp.feedback.simulated import RuleBasedAnnotator, SimulatedHuman

IDS = [f"q{i}" for i in range(2000)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_human_sets_are_nested_across_ratios(seed):
    sets = [human_ids(IDS, r, seed) for r in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)]
    assert sets[0] == set() and sets[-1] == set(IDS)
    for lower, higher in itertools.pairwise(sets):
        assert lower <= higher


def test_human_share_is_exactly_the_rounded_ratio_and_depends_on_the_seed():
    for n in (1, 3, 7, 40, 41, 2000):
        for ratio in (0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0):
            assert len(human_ids(IDS[:n], ratio, 0)) == math.floor(ratio * n + 0.5), (n, ratio)
    assert len(human_ids(IDS[:40], 0.25, 0)) == 10  # not 15 of 40 (37.5%), as a coin per example gave
    assert human_ids(IDS, 0.5, 0) == human_ids(list(reversed(IDS)), 0.5, 0)  # order does not matter
    assert human_ids(IDS, 0.5, 0) != human_ids(IDS, 0.5, 1)


def test_overlap_is_an_exact_share_nested_across_human_ratios():
    low, high = human_ids(IDS[:200], 0.25, 3), human_ids(IDS[:200], 0.75, 3)
    o_low, o_high = overlap_ids(sorted(low), 0.1, 3), overlap_ids(sorted(high), 0.1, 3)
    assert (len(o_low), len(o_high)) == (5, 15) and o_low <= low and o_low < o_high <= high


def test_ratio_out_of_range_is_refused():
    with pytest.raises(ValueError, match="human_ratio"):
        human_ids(IDS, 1.5, 0)


def test_annotate_mixes_pools_and_records_sources():
    examples = examples_from_squad(generate(0, "train", 300))
    answers = [Answer(ex.id, ex.question, "Nobody", " Nobody") for ex in examples]
    fb = annotate(examples, answers, SimulatedHuman(), RuleBasedAnnotator(), 0.3, seed=5).feedback
    assert [f.id for f in fb] == [ex.id for ex in examples]
    chosen = human_ids([ex.id for ex in examples], 0.3, 5)
    for f in fb:
        assert (f.source, f.annotator) == (
            ("human", "simulated_human") if f.id in chosen else ("synthetic", "rule_based")
        )
        assert f.prediction == "Nobody" and f.feedback
    human = [f for f in fb if f.source == "human"]
    # "Nobody" is wrong everywhere; the simulated human always says so and names the fix
    assert all(f.verdict in ("incorrect", "no_answer") and f.correction is not None for f in human)
    assert len({f.feedback.split(" ")[0] for f in human}) >= 3  # varied phrasing


class RecordingHuman(SimulatedHuman):
    def __init__(self, calls: list[str]):
        super().__init__()
        self.calls = calls

    def annotate(self, ex, prediction):
        self.calls.append("human")
        return super().annotate(ex, prediction)


class FakeLLM(Annotator):
    """An annotator with the batching interface of the LLM annotators."""

    source, name = "synthetic", "fake_llm"

    def __init__(self, calls: list[str]):
        self.calls, self.shots, self.batches = calls, None, []

    def prepare(self, shots):
        self.calls.append("prepare")
        self.shots = list(shots)

    def annotate_many(self, items):
        self.calls.append("synthetic")
        self.batches.append(list(items))
        return [f'Wrong. The answer is "{ex.gold}", not {prediction}.' for ex, prediction in items]

    def annotate(self, ex, prediction):
        raise AssertionError("a batching annotator is called through annotate_many")


@pytest.mark.parametrize("overlap_ratio", [0.0, 0.4])
def test_batching_annotator_is_prepared_with_the_human_items_then_called_once(overlap_ratio):
    examples = examples_from_squad(generate(0, "train", 120))
    answers = [Answer(ex.id, ex.question, "Nobody", " Nobody") for ex in examples]
    calls: list[str] = []
    llm = FakeLLM(calls)
    result = annotate(examples, answers, RecordingHuman(calls), llm, 0.3, seed=5, overlap_ratio=overlap_ratio)
    chosen = human_ids([ex.id for ex in examples], 0.3, 5)
    both = overlap_ids(sorted(chosen), overlap_ratio, 5)
    assert (overlap_ratio == 0) == (not both)
    # Human feedback first, then one prepare, then one synthetic batch.
    assert calls == ["human"] * len(chosen) + ["prepare", "synthetic"]
    human = {f.id: f for f in result.feedback if f.source == "human"}
    assert set(human) == chosen
    assert [(ex.id, pred, text) for ex, pred, text in llm.shots] == [
        (ex.id, "Nobody", human[ex.id].feedback) for ex in examples if ex.id in chosen - both
    ]
    (batch,) = llm.batches
    assert [ex.id for ex, _ in batch] == [ex.id for ex in examples if ex.id not in chosen or ex.id in both]
    for f in result.feedback:
        if f.source == "synthetic":
            assert f.annotator == "fake_llm" and f.verdict == "incorrect" and f.correction is not None
    assert [(h.id, s.id, h.source, s.annotator) for h, s in result.overlap] == [
        (ex.id, ex.id, "human", "fake_llm") for ex in examples if ex.id in both
    ]


def test_overlap_is_nested_and_never_changes_the_training_feedback():
    examples = examples_from_squad(generate(1, "train", 300))
    answers = [Answer(ex.id, ex.question, ex.gold, "") for ex in examples]
    runs = {
        r: annotate(examples, answers, SimulatedHuman(), RuleBasedAnnotator(), 0.5, 2, overlap_ratio=r)
        for r in (0.0, 0.2, 0.5)
    }
    assert runs[0.0].overlap == [] and runs[0.0].fallback == 0
    assert runs[0.0].feedback == runs[0.2].feedback == runs[0.5].feedback
    low, high = ({h.id for h, _ in runs[r].overlap} for r in (0.2, 0.5))
    human = {f.id for f in runs[0.5].feedback if f.source == "human"}
    assert low < high <= human
    assert abs(len(high) / len(human) - 0.5) < 0.15
    for h, s in runs[0.5].overlap:
        assert (h.source, s.source, h.prediction) == ("human", "synthetic", s.prediction)
    with pytest.raises(ValueError, match="feedback.overlap_ratio"):
        overlap_ids(["a"], 1.5, 0)


def _fake_stage1(calls):
    """A stand-in for laffi_exp.stages.answer.stage1_answers: tiny splits and answers."""

    def stage1_answers(cfg):
        calls.append(cfg)
        splits = {
            name: examples_from_squad(generate(0, name, n))
            for name, n in (("train", 60), ("validation", 20), ("test", 5))
        }
        answers = {
            name: [Answer(ex.id, ex.question, "" if i % 5 == 0 else "Nobody", "") for i, ex in enumerate(splits[name])]
            for name in ("train", "validation")
        }
        return splits, answers

    return stage1_answers


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_export_command_writes_the_human_share_of_train_and_validation(tmp_path, monkeypatch, capsys):
    from laffi_exp.stages import answer as answer_stage

    calls = []
    monkeypatch.setattr(answer_stage, "stage1_answers", _fake_stage1(calls), raising=False)
    assert main(["export", "--out", str(tmp_path / "low"), "feedback.human_ratio=0.3", "seed=7"]) == 0
    assert (
        main(["export", "feedback.human_ratio=0.6", "--include-gold", "seed=7", "--out", str(tmp_path / "high")]) == 0
    )
    assert [c.feedback.human_ratio for c in calls] == [0.3, 0.6] and calls[0].seed == 7
    splits, _ = _fake_stage1([])(None)
    ids = [ex.id for ex in splits["train"] + splits["validation"]]
    low, high = _rows(tmp_path / "low.csv"), _rows(tmp_path / "high.csv")
    per_split = [splits["train"], splits["validation"]]
    assert [r["id"] for r in low] == [i for i in ids if i in human_ids_by_split(per_split, 0.3, 7)]
    assert [r["id"] for r in high] == [i for i in ids if i in human_ids_by_split(per_split, 0.6, 7)]
    assert {r["id"] for r in low} < {r["id"] for r in high}
    assert "gold" not in low[0] and "gold" in high[0]
    assert {r["prediction"] for r in low} == {"Nobody", "unanswerable"}
    assert "wrote" in capsys.readouterr().out and (tmp_path / "low.jsonl").is_file()

    chosen = tmp_path / "ids.txt"
    chosen.write_text(f"# to re-annotate\n{ids[3]}\n\n{ids[70]}\n")
    assert main(["export", "--ids", str(chosen), "--out", str(tmp_path / "chosen")]) == 0
    assert [r["id"] for r in _rows(tmp_path / "chosen.csv")] == [ids[3], ids[70]]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "--ids", "/does/not/exist.txt"], "--ids: no such file"),
        (["export", "no_such_key=3"], "no_such_key"),
        (["export", "feedback.human_ratio=0.0"], "feedback.human_ratio=0.0 gives no example to humans"),
        (["export", "feedback.human_ratio=2"], "feedback.human_ratio"),
    ],
)
def test_export_command_bad_input_is_one_line(args, needle, tmp_path, monkeypatch, capsys):
    from laffi_exp.stages import answer as answer_stage

    monkeypatch.setattr(answer_stage, "stage1_answers", _fake_stage1([]), raising=False)
    assert main([*args, "--out", str(tmp_path / "batch")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "batch.csv").exists()


def test_export_command_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    from laffi_exp.stages import answer as answer_stage

    calls = []
    monkeypatch.setattr(answer_stage, "stage1_answers", _fake_stage1(calls), raising=False)
    (tmp_path / "batch.csv").write_text("id,prediction,feedback,annotator_id\nq,Bob,Correct.,ann\n")
    before = (tmp_path / "batch.csv").read_bytes()
    assert main(["export", "--out", str(tmp_path / "batch")]) == 2
    assert "batch.csv exists" in capsys.readouterr().err and (tmp_path / "batch.csv").read_bytes() == before
    assert calls == []  # refused before predicting any answer
    assert main(["export", "--out", str(tmp_path / "batch"), "--force"]) == 0


@pytest.mark.parametrize("args", [[], ["export", "--bogus"], ["import"]])
def test_bad_command_line_is_one_line_with_exit_code_2(args):
    proc = subprocess.run(
        [sys.executable, "-m", "laffi_exp.annotate", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
