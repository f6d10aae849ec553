"""The attention analysis: every measure against values worked out by hand (hand-set weights, and a tiny
Llama whose attention is uniform by construction), prompt segments in a real tokenizer's tokens, base vs
fine-tuned on a tiny trained run, the command line and its errors, and the sweep report's table."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from laffi_exp.attention import analysis as attention
from laffi_exp.attention.__main__ import main, parse_layers
from laffi_exp.attention.analysis import Options, analyze, collect, eager_attention, load_run
from laffi_exp.attention.measures import MEASURES, SCOPES, head_measures, row_measures
from laffi_exp.attention.segments import SegmentedPrompt, gold_span, prompt_spans, render, segment_prompt
from laffi_exp.core.config import model_source
from laffi_exp.core.errors import ConfigError
from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import QAExample

from .conftest import SQUAD_DEV, TINYLLAMA, needs

OUTPUTS = ("summary.csv", "summary.md", "paired.csv", "analysis.json", "layers.png", "heads_delta.png")


def _measure(values: torch.Tensor, scope: str, name: str) -> torch.Tensor:
    return values[SCOPES.index(scope), MEASURES.index(name)]


# -- measures on hand-set attention -----------------------------------------------------------------
# Five tokens: 0 the sink, 1 template, 2-3 context (3 is the gold span), 4 question. Head 0's rows are
# written out; rows sum to 1 over the keys j <= i.
HAND = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0, 0.0],
        [0.1, 0.2, 0.3, 0.4, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
    ]
)
HAND_MASKS = {
    "template": torch.tensor([False, True, False, False, False]),
    "context": torch.tensor([False, False, True, True, False]),
    "question": torch.tensor([False, False, False, False, True]),
    "gold": torch.tensor([False, False, False, True, False]),
}


def _entropy(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_every_measure_on_hand_set_weights():
    values = head_measures(HAND[None], HAND_MASKS, window=2, far=1)[..., 0]
    # Rows 1..4 by hand (window 2: keys j >= 1 with i - j < 2; far 1: keys j >= 1 with i - j > 1):
    #   local    0.5, 0.3+0.5, 0.3+0.4, 1           far  0, 0, 0.2, 0
    #   distance 0, (1*0.3)/0.8, (2*0.2+1*0.3)/0.9, 0   sink 0.5, 0.2, 0.1, 0
    #   template 0.5, 0.3, 0.2, 0   context 0, 0.5, 0.7, 0   question 0, 0, 0, 1   gold 0, 0, 0.4, 0
    expected_all = {
        "local": (0.5 + 0.8 + 0.7 + 1.0) / 4,
        "far": 0.2 / 4,
        "distance": (0.0 + 0.375 + 0.7 / 0.9 + 0.0) / 4,
        "entropy": (_entropy(0.5, 0.5) + _entropy(0.2, 0.3, 0.5) + _entropy(0.1, 0.2, 0.3, 0.4) + 0.0) / 4,
        "sink": (0.5 + 0.2 + 0.1 + 0.0) / 4,
        "template": (0.5 + 0.3 + 0.2) / 4,
        "context": (0.5 + 0.7) / 4,
        "question": 1.0 / 4,
        "gold": 0.4 / 4,
    }
    expected_gen = {
        "local": 1.0,
        "far": 0.0,
        "distance": 0.0,
        "entropy": 0.0,
        "sink": 0.0,
        "template": 0.0,
        "context": 0.0,
        "question": 1.0,
        "gold": 0.0,
    }
    for name, value in expected_all.items():
        assert _measure(values, "all", name).item() == pytest.approx(value, abs=1e-6), name
    for name, value in expected_gen.items():
        assert _measure(values, "gen", name).item() == pytest.approx(value, abs=1e-6), name
    assert torch.isnan(_measure(values, "all", "prediction"))  # not in this prompt


def test_segments_and_sink_partition_every_row_and_heads_are_independent():
    uniform = torch.tril(torch.ones(5, 5)) / torch.arange(1, 6)[:, None]
    rows = row_measures(torch.stack([HAND, uniform]), HAND_MASKS, window=2, far=1)
    total = rows["sink"] + rows["template"] + rows["context"] + rows["question"]
    assert torch.allclose(total, torch.ones_like(total))
    assert torch.allclose(rows["entropy"][1], torch.log(torch.arange(1, 6, dtype=torch.float)))
    alone = row_measures(HAND[None], HAND_MASKS, window=2, far=1)
    assert all(torch.allclose(rows[m][0], alone[m][0], equal_nan=True) for m in MEASURES)


def test_distance_is_undefined_for_a_row_all_on_the_sink_and_left_out_of_the_mean():
    attn = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])[None]
    rows = row_measures(attn, {}, window=1, far=5)
    assert torch.isnan(rows["distance"][0, 1]) and rows["distance"][0, 2].item() == pytest.approx(0.5)
    assert _measure(head_measures(attn, {}, window=1, far=5), "all", "distance").item() == pytest.approx(0.5)


def _uniform_llama(layers: int = 2, heads: int = 2):
    """A tiny Llama whose query projections are zero: every score is 0, so each query attends uniformly
    to itself and every earlier token, a_ij = 1/(i+1), in every layer and head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    return model


def _prompt(n: int, context: range, seed: int) -> SegmentedPrompt:
    ids = torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    masks = {name: np.zeros(n, dtype=bool) for name in ("template", "context", "question", "prediction", "gold")}
    masks["context"][list(context)] = True
    masks["template"][[t for t in range(1, n) if t not in context]] = True
    return SegmentedPrompt(f"p{seed}", "answer", "", ids, {}, masks)


def _uniform_expected(n: int, context: range, window: int, far: int) -> dict[str, tuple[float, float]]:
    """(all, gen) of each measure under a_ij = 1/(i+1), worked out in closed form for rows i = 1..n-1."""
    rows = range(1, n)
    per_row = {
        "sink": [1 / (i + 1) for i in rows],
        "local": [min(i, window) / (i + 1) for i in rows],
        "far": [max(0, i - far - 1) / (i + 1) for i in rows],
        "distance": [(i - 1) / 2 for i in rows],
        "entropy": [math.log(i + 1) for i in rows],
        "context": [sum(1 for j in context if j <= i) / (i + 1) for i in rows],
    }
    return {name: (float(np.mean(v)), v[-1]) for name, v in per_row.items()}


def test_a_model_with_uniform_attention_gives_the_closed_forms_through_batches_and_layers():
    model = _uniform_llama()
    contexts = [range(2, 5), range(3, 15), range(1, 11)]
    prompts = [_prompt(n, context, seed) for seed, (n, context) in enumerate(zip((7, 20, 12), contexts))]
    with eager_attention(model):
        values, kept = collect(model, prompts, layers=[0, 1], window=3, far=4, batch_size=2, keep=[1])
    assert values.shape == (3, 2, len(SCOPES), len(MEASURES), 2)  # prompts, layers, scopes, measures, heads
    for p, (prompt, context) in enumerate(zip(prompts, contexts)):
        for name, (mean_all, gen) in _uniform_expected(prompt.length, context, window=3, far=4).items():
            m = MEASURES.index(name)
            np.testing.assert_allclose(values[p, :, 0, m, :], mean_all, atol=1e-5, err_msg=f"{name}, all")
            np.testing.assert_allclose(values[p, :, 1, m, :], gen, atol=1e-5, err_msg=f"{name}, gen")
    assert kept[1].shape == (2, 20, 20)
    np.testing.assert_allclose(kept[1][0], np.tril(np.ones((20, 20))) / np.arange(1, 21)[:, None], atol=1e-6)


def test_eager_attention_is_switched_on_for_the_analysis_and_put_back():
    model = _uniform_llama(layers=1)
    model.set_attn_implementation("sdpa")
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


# -- segments ---------------------------------------------------------------------------------------
def test_render_finds_every_field_in_any_template_order():
    template = "Q: {question}\n{context}\nQ again: {question}\nA:"
    text, spans = render(template, {"context": "ctx here", "question": "why?"})
    assert text == "Q: why?\nctx here\nQ again: why?\nA:"
    assert [text[s:e] for s, e in spans["question"]] == ["why?", "why?"]
    assert [text[s:e] for s, e in spans["context"]] == ["ctx here"]
    with pytest.raises(ConfigError, match="answer"):
        render("{answer}", {"context": "", "question": ""})


def test_spans_follow_a_chat_wrapper_and_the_shown_no_answer_text():
    ex = QAExample("q", "t", "Ada lives in Rome.", "Where does Ada live?", ("Rome",), (13,))
    prompter = Prompter(wrap=lambda p: f"<user>\n{p}\n<assistant>\n")
    text, spans = prompt_spans(prompter, "feedback", ex, "")
    assert text == prompter.feedback_prompt(ex, "")
    assert [text[s:e] for s, e in spans["prediction"]] == ["unanswerable"]
    assert [text[s:e] for s, e in spans["gold"]] == ["Rome"]
    assert [text[s:e] for s, e in spans["context"]] == [ex.context]


def test_gold_span_falls_back_to_the_text_and_is_none_outside_a_shortened_context():
    assert gold_span(QAExample("q", "t", "a b c", "?", ("b",), (9,))) == (2, 3)  # stale start
    assert gold_span(QAExample("q", "t", "a b c", "?", ("z",), (0,))) is None  # cut off by the window
    assert gold_span(QAExample("q", "t", "a b c", "?", (), ())) is None


def _squad_example(qid: str) -> QAExample:
    from laffi_exp.data.squad_format import examples_from_squad

    return next(ex for ex in examples_from_squad(json.loads(SQUAD_DEV.read_text())) if ex.id == qid)


def _text_of(prompt: SegmentedPrompt, tokenizer, name: str) -> str:
    return tokenizer.decode([t for t, m in zip(prompt.input_ids, prompt.masks[name]) if m]).strip()


@needs(SQUAD_DEV)
@needs(TINYLLAMA)
@pytest.mark.parametrize("qid, where", [("56de49a8cffd8e1900b4b7a7", "start"), ("571cd5b1dd7acb1400e4c17c", "end")])
def test_segments_in_tinyllamas_tokens_on_a_squad_prompt(qid, where):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINYLLAMA, local_files_only=True)
    ex = _squad_example(qid)
    start, end = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
    assert (start == 0) if where == "start" else (end == len(ex.context))
    prompter = Prompter()
    prompt = segment_prompt(tokenizer, prompter, "feedback", ex, "an answer")
    assert prompt.text == prompter.feedback_prompt(ex, "an answer")
    assert prompt.input_ids == tokenizer(prompt.text)["input_ids"]
    offsets = tokenizer(prompt.text, return_offsets_mapping=True)["offset_mapping"]
    ((g0, g1),) = prompt.spans["gold"]
    assert prompt.text[g0:g1] == ex.answers[0]
    gold = np.flatnonzero(prompt.masks["gold"])
    # The gold tokens are one run that covers the span and nothing outside it but a leading space.
    assert list(gold) == list(range(gold[0], gold[-1] + 1))
    assert offsets[gold[0]][0] <= g0 < offsets[gold[0]][1] and offsets[gold[-1]][0] < g1 <= offsets[gold[-1]][1]
    assert prompt.text[offsets[gold[0]][0] : g0].strip() == "" and offsets[gold[-1]][1] == g1
    assert _text_of(prompt, tokenizer, "gold") == ex.answers[0]
    assert prompt.masks["context"][gold].all()  # the gold span is a part of the context
    context = np.flatnonzero(prompt.masks["context"])
    if where == "start":
        assert gold[0] == context[0]
    else:
        assert gold[-1] == context[-1]
    for name, value in (("context", ex.context), ("question", ex.question), ("prediction", "an answer")):
        tokens = np.flatnonzero(prompt.masks[name])  # one run of tokens covering exactly the field
        assert list(tokens) == list(range(tokens[0], tokens[-1] + 1)), name
        assert prompt.text[offsets[tokens[0]][0] : offsets[tokens[-1]][1]].lstrip(" ") == value, name
    # Every token but the sink is in exactly one of the template and the fields.
    parts = np.stack([prompt.masks[n] for n in ("template", "context", "question", "prediction")])
    assert parts[:, 0].sum() == 0 and (parts[:, 1:].sum(0) == 1).all()
    template = [tokenizer.convert_ids_to_tokens(t) for t, m in zip(prompt.input_ids, prompt.masks["template"]) if m]
    assert "".join(template).replace("▁", "").replace("<0x0A>", "") == "Context:Question:Answer:Feedback:"


# -- a tiny finished run, trained by hand ------------------------------------------------------------
def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from laffi_exp.core.config import CONF_DIR

    from .conftest import TINY

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A run dir as the pipeline leaves it (resolved config, held-out data, predictions, adapter, a
    finished manifest) for the tiny embedded base, its LoRA adapter trained a few steps here: seconds,
    where a pipeline run takes a minute (that one is ``tiny_run``, slow)."""
    from hydra.utils import instantiate
    from peft import get_peft_model

    from laffi_exp.data.squad_format import examples_from_squad

    out = tmp_path_factory.mktemp("finished_run")
    cfg = _compose(f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}", "analysis.attention_num=10")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    test = instantiate(cfg.dataset).splits()["test"]
    (out / "eval_data.json").write_text(json.dumps(test))
    examples = examples_from_squad(test)
    (out / "predictions.json").write_text(json.dumps({ex.id: ex.context.split()[0] for ex in examples}))
    base = instantiate(model_source(cfg)).load()
    torch.manual_seed(0)
    model = get_peft_model(base.model, instantiate(cfg.method.lora, _convert_="all"))
    prompter = Prompter()
    texts = [prompter.answer_prompt(ex) + prompter.answer_target(ex.gold) for ex in examples[:8]]
    batch = base.tokenizer(texts, return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out / "adapter")
    (out / "manifest.json").write_text(json.dumps({"status": "finished"}))
    return out


def test_base_and_fine_tuned_differ_and_the_disabled_adapter_is_the_plain_base(finished_run):
    from hydra.utils import instantiate

    result = analyze(load_run(finished_run, "cpu"), Options(num=6))
    for kind in ("answer", "feedback"):
        base, tuned = result.values[(kind, "base")], result.values[(kind, "fine_tuned")]
        assert np.nanmax(np.abs(tuned - base)) > 1e-4, kind  # training moved the attention
    plain = instantiate(model_source(OmegaConf.load(finished_run / "config.yaml"))).load().model
    with eager_attention(plain):
        for kind in ("answer", "feedback"):
            values, _ = collect(plain, result.prompts[kind], result.layers, 8, 32, batch_size=1)
            np.testing.assert_allclose(values, result.values[(kind, "base")], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_the_cli_writes_every_output(finished_run, capsys):
    assert main([str(finished_run), "--device", "cpu"]) == 0
    assert "## Feedback prompt" in capsys.readouterr().out
    folder = finished_run / "attention"
    for name in OUTPUTS:
        assert (folder / name).is_file(), name
    info = json.loads((folder / "analysis.json").read_text())
    assert info["prompts"] == 10 and info["attn_implementation"] == "eager"  # analysis.attention_num of the run
    assert len(info["examples"]) == 1 and (folder / f"example_{info['examples'][0]}.png").is_file()
    rows = list(_rows(folder / "summary.csv"))
    assert {r["model"] for r in rows} == {"base", "fine_tuned", "delta"}
    assert {r["prompt"] for r in rows} == {"answer", "feedback"} and {r["scope"] for r in rows} == set(SCOPES)
    assert {r["measure"] for r in rows} == set(MEASURES)
    assert not any(r["measure"] == "prediction" and r["prompt"] == "answer" for r in rows)  # not in that prompt
    assert {r["head"] for r in rows} == {"0", "1", "mean"} and {r["layer"] for r in rows} == {"0", "mean"}
    md = (folder / "summary.md").read_text()
    assert "## Answer prompt" in md and "## Feedback prompt" in md and "Eager attention" in md


def _rows(path: Path):
    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def test_statistics_do_not_depend_on_the_batch_size(finished_run):
    run = load_run(finished_run, "cpu")
    one, many = (analyze(run, Options(num=6, batch_size=b, examples=0)) for b in (1, 6))
    for key in one.values:
        np.testing.assert_allclose(one.values[key], many.values[key], rtol=1e-4, atol=1e-6)


def test_layers_selection(finished_run):
    result = analyze(load_run(finished_run, "cpu"), Options(num=2, layers=(-1,), examples=0))
    assert result.layers == [0] and result.values[("answer", "base")].shape[1] == 1
    assert parse_layers(["0,2", "5-7", "-1"]) == (0, 2, 5, 6, 7, -1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "7"], "layers: layer 7 is not one of the model's 1 layers"),
        (["--layers", "x"], "--layers: expected layer numbers"),
        (["--num", "0"], "num: expected an integer >= 1"),
        (["--num", "many"], "argument --num: invalid int value"),
        (["--device", "tpu"], "device: expected auto, cpu, cuda"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(finished_run, args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main([str(finished_run), "--out", str(tmp_path), *args]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_missing_or_unfinished_run_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: no such run dir"
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "manifest.json").write_text('{"status": "running"}')
    assert main([str(tmp_path / "running")]) == 2
    assert "not a finished run (status 'running')" in capsys.readouterr().err
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text('{"status": "finished"}')
    assert main([str(done)]) == 2
    assert "lacks config.yaml, eval_data.json, predictions.json, adapter/adapter_config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_prints_no_traceback(tmp_path):
    command = [sys.executable, "-m", "laffi_exp.attention", str(tmp_path / "nowhere")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such run dir"]


# -- the pipeline: analysis.attention=true (slow: a whole tiny run) ----------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    """A tiny SFT run of the pipeline with ``analysis.attention=true``: analysed at its end."""
    from laffi_exp.pipeline import run

    out = tmp_path_factory.mktemp("attention_run")
    cfg = _compose(
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={out}",
        f"cache.dir={out.parent / 'attn_stages'}",
        "method=sft",
        "evaluation.na_probs=false",
        "analysis.attention=true",
        "analysis.attention_num=12",
    )
    run(cfg)
    return cfg, out


@pytest.mark.slow
def test_a_run_analyses_itself_as_the_command_does(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    for name in OUTPUTS:
        assert (out / "attention" / name).is_file(), name
    result = analyze(load_run(out, "cpu"), Options(num=12, examples=0))
    assert np.nanmax(np.abs(result.values[("answer", "fine_tuned")] - result.values[("answer", "base")])) > 1e-6
    assert main([str(out), "--out", str(tmp_path / "again"), "--batch-size", "3", "--device", "cpu"]) == 0
    # The run's own model (in the pipeline) and one loaded from the run dir, in other batches: the same
    # numbers, to float rounding (batch shapes change the order of the sums).
    again, first = (_read_summary(folder / "summary.csv") for folder in (tmp_path / "again", out / "attention"))
    assert again.keys() == first.keys()
    np.testing.assert_allclose([again[k] for k in first], list(first.values()), rtol=1e-4, atol=1e-6)


def _read_summary(path: Path) -> dict[tuple, float]:
    return {
        tuple(r[c] for c in ("prompt", "scope", "layer", "head", "model", "measure", "n")): float(r["mean"])
        for r in _rows(path)
    }


@pytest.mark.slow
def test_a_finished_run_asked_again_gets_the_analysis_it_lacks_without_training(tiny_run):
    from laffi_exp.pipeline import run

    cfg, out = tiny_run
    before = _read_summary(out / "attention" / "summary.csv")
    manifest = (out / "manifest.json").read_text()
    for item in (out / "attention").iterdir():
        item.unlink()
    run(cfg)
    after = _read_summary(out / "attention" / "summary.csv")
    np.testing.assert_allclose([after[k] for k in before], list(before.values()), rtol=1e-4, atol=1e-6)
    assert (out / "manifest.json").read_text() == manifest  # the run itself was skipped


def test_the_analysis_keys_are_no_part_of_a_runs_fingerprint(make_cfg):
    from laffi_exp.runs import sweep

    plain = sweep.run_identity(make_cfg())
    assert sweep.run_identity(make_cfg("analysis.attention=true", "analysis.attention_num=5")) == plain


def test_options_come_from_the_run_config_then_the_command_line():
    keys = {"attention_num": 5, "attention_window": 3, "attention_far": 9, "attention_layers": [0]}
    cfg = OmegaConf.create({"analysis": keys})
    assert attention.options_from_config(cfg) == Options(num=5, window=3, far=9, layers=(0,))
    assert attention.options_from_config(cfg, num=7, layers=None).num == 7
    assert attention.options_from_config(OmegaConf.create({})) == Options()
    assert attention.options_from_config(OmegaConf.create({"analysis": {"attention_layers": -1}})).layers == (-1,)
    with pytest.raises(ConfigError, match="window: expected an integer >= 1, got 2.5"):
        attention.options_from_config(OmegaConf.create({"analysis": {"attention_window": 2.5}}))


# -- the sweep report -------------------------------------------------------------------------------
def _summary_csv(path: Path, delta: float, tuned: float, base: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "scope", "layer", "head", "model", "measure", "n", "mean", "ci_low", "ci_high"])
        for prompt in ("answer", "feedback"):
            for scope in SCOPES:
                for measure in MEASURES:
                    for model, value in (("base", base), ("fine_tuned", tuned), ("delta", delta)):
                        writer.writerow([prompt, scope, "mean", "mean", model, measure, 10, value, "", ""])
                        writer.writerow([prompt, scope, 0, 0, model, measure, 10, 99.0, "", ""])  # not read


def _job_config(job: Path, method: str, ratio: float, seed: int) -> None:
    config = {"seed": seed, "method": {"name": method}, "feedback": {"human_ratio": ratio}}
    (job / "config.yaml").write_text(OmegaConf.to_yaml(config))


def test_the_sweep_report_aggregates_the_headline_measures_over_seeds(tmp_path):
    from laffi_exp.runs.report import build_report

    from .test_report import T1

    deltas = {("laffi", 0.5, 0): 0.10, ("laffi", 0.5, 1): 0.20, ("sft", 0.5, 0): -0.05, ("sft", 0.5, 1): -0.05}
    for (method, ratio, seed), delta in deltas.items():
        job = tmp_path / f"{method}_seed{seed}"
        job.mkdir()
        _job_config(job, method, ratio, seed)
        (job / "metrics.json").write_text(json.dumps({"test/exact": 10.0, "base/exact": 5.0}))
        _summary_csv(job / "attention" / "summary.csv", delta, 0.5 + delta, 0.5)
    (tmp_path / "laffi_seed2").mkdir()  # a finished job analysed without attention
    _job_config(tmp_path / "laffi_seed2", "laffi", 0.5, 2)
    (tmp_path / "laffi_seed2" / "metrics.json").write_text(json.dumps({"test/exact": 10.0}))
    report = build_report(tmp_path)
    with open(tmp_path / "attention.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    laffi = [r for r in rows if r["method"] == "laffi"]
    assert len(laffi) == 2 * 2 * 6 and len(rows) == 2 * len(laffi)  # prompts x scopes x headline measures, 2 methods
    row = next(r for r in laffi if r["prompt"] == "answer" and r["scope"] == "all" and r["measure"] == "local")
    assert float(row["delta_mean"]) == pytest.approx(0.15) and row["n"] == "2" and row["seeds"] == "0 1"
    assert float(row["delta_ci95"]) == pytest.approx(T1 * np.std([0.1, 0.2], ddof=1) / math.sqrt(2))
    assert float(row["fine_tuned_mean"]) == pytest.approx(0.65) and float(row["base_mean"]) == pytest.approx(0.5)
    assert "## Attention: fine-tuned − base" in report.markdown
    assert "| laffi | 50% | answer | all positions | +0.150 ±" in report.markdown
    assert "laffi_seed2" in report.markdown  # named in the notes as lacking the analysis
    assert tmp_path / "attention.csv" in report.files


def test_a_sweep_without_attention_has_no_attention_table(tmp_path):
    from laffi_exp.runs.report import build_report

    job = tmp_path / "laffi_seed0"
    job.mkdir()
    _job_config(job, "laffi", 0.5, 0)
    (job / "metrics.json").write_text(json.dumps({"test/exact": 10.0}))
    report = build_report(tmp_path)
    assert not (tmp_path / "attention.csv").exists() and "Attention" not in report.markdown


# -- a real checkpoint ------------------------------------------------------------------------------
@pytest.mark.slow
@needs(SQUAD_DEV)
@needs(TINYLLAMA)
def test_a_tinyllamas_squad_run_is_analysed(make_cfg, tmp_path):
    from laffi_exp.pipeline import run

    cfg = make_cfg(
        "dataset=squad_v2",
        f"dataset.path={SQUAD_DEV.parent}",
        "dataset.num_train=16",
        "dataset.num_val=4",
        "dataset.num_eval=12",
        "model=hf",
        f"model.name_or_path={TINYLLAMA}",
        "model.max_length=512",
        "trainer.max_steps=3",
        "analysis.attention=true",
        embedded=False,
    )
    run(cfg)
    info = json.loads((tmp_path / "run" / "attention" / "analysis.json").read_text())
    assert info["layers"] == [0, 1, 2, 3, 4] and info["heads"] == 8 and info["prompts"] == 12
    for name in OUTPUTS:
        assert (tmp_path / "run" / "attention" / name).is_file(), name
