"""The hybrid mix: which examples take human feedback, and the records it writes."""

from __future__ import annotations

import pytest

from laffi_exp.annotate import RuleBasedAnnotator, SimulatedHuman, annotate, human_ids
from laffi_exp.data.squad import examples_from_squad
from laffi_exp.data.synthetic import generate
from laffi_exp.records import Answer

IDS = [f"q{i}" for i in range(2000)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_human_sets_are_nested_across_ratios(seed):
    sets = [human_ids(IDS, r, seed) for r in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)]
    assert sets[0] == set() and sets[-1] == set(IDS)
    for lower, higher in zip(sets, sets[1:]):
        assert lower <= higher


def test_human_share_is_close_to_the_ratio_and_depends_on_the_seed():
    for ratio in (0.25, 0.5, 0.75):
        assert abs(len(human_ids(IDS, ratio, 0)) / len(IDS) - ratio) < 0.04
    assert human_ids(IDS, 0.5, 0) == human_ids(list(reversed(IDS)), 0.5, 0)  # order does not matter
    assert human_ids(IDS, 0.5, 0) != human_ids(IDS, 0.5, 1)


def test_ratio_out_of_range_is_refused():
    with pytest.raises(ValueError, match="human_ratio"):
        human_ids(IDS, 1.5, 0)


def test_annotate_mixes_pools_and_records_sources():
    examples = examples_from_squad(generate(0, "train", 300))
    answers = [Answer(ex.id, ex.question, "Nobody", " Nobody") for ex in examples]
    fb = annotate(examples, answers, SimulatedHuman(), RuleBasedAnnotator(), 0.3, seed=5)
    assert [f.id for f in fb] == [ex.id for ex in examples]
    chosen = human_ids([ex.id for ex in examples], 0.3, 5)
    for f in fb:
        assert (f.source, f.annotator) == (("human", "simulated_human") if f.id in chosen else ("synthetic", "rule_based"))
        assert f.prediction == "Nobody" and f.feedback
    human = [f for f in fb if f.source == "human"]
    # "Nobody" is wrong everywhere; the simulated human always says so and names the fix
    assert all(f.verdict == "incorrect" and f.correction is not None for f in human)
    assert len({f.feedback.split(" ")[0] for f in human}) >= 3  # varied phrasing
