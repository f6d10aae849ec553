"""No-answer probabilities (the official SQuAD 2.0 ``--na-prob-file``): teacher-forced sequence
log-likelihoods, the sigmoid of the no-answer vs answer difference, and the ``best_*`` metrics."""

from __future__ import annotations

import math

import pytest
import torch

from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import Answer, QAExample
from laffi_exp.models.generation import sequence_logprobs
from laffi_exp.scoring.squad_metrics import score_examples
from laffi_exp.stages.answer import predict_answers
from laffi_exp.stages.evaluate import no_answer_probs, score

from .test_train import tiny_llama

BEST_KEYS = ("best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh")


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny BPE tokenizer that, like Llama's, adds BOS with ``add_special_tokens=True``, so the
    tests see whether the prompt gets special tokens and the continuation does not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["Context: a b c. Question: who? Answer: Bob unanswerable Feedback: Correct."] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert fast("a")["input_ids"][0] == fast.bos_token_id
    assert fast("a", add_special_tokens=False)["input_ids"][0] != fast.bos_token_id
    return fast


PROMPTS = [
    "Context: a b c. Question: who? Answer:",
    "Context: a.",
    "Context: a b c d d d d d d d d. Question: who? Answer:",
    "Q:",
    "Context: b c. Question: who?",
]
CONTINUATIONS = [" Bob", " unanswerable", " a b c d", " Bob Feedback: Correct.", " c"]


def by_hand(model, tokenizer, prompt: str, continuation: str) -> float:
    """One pair alone, no padding: forward pass, log-softmax, gather the continuation tokens."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(c))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer)).double()


@pytest.fixture(scope="module")
def expected(model, tokenizer):
    model.eval()
    return [by_hand(model, tokenizer, p, c) for p, c in zip(PROMPTS, CONTINUATIONS)]


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_sequence_logprobs_equal_a_hand_computation(model, tokenizer, expected, batch_size):
    lengths = {
        len(tokenizer(p)["input_ids"]) + len(tokenizer(c, add_special_tokens=False)["input_ids"])
        for p, c in zip(PROMPTS, CONTINUATIONS)
    }
    assert len(lengths) > 1  # the batch really is padded
    got = sequence_logprobs(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=batch_size)
    assert len(got) == len(PROMPTS)
    assert got == pytest.approx(expected, abs=1e-5)
    assert all(v < 0 for v in got)


def test_sequence_logprobs_read_logits_at_scored_positions_only(model, tokenizer, expected, monkeypatch):
    """The output head runs only where a continuation token is scored: no (batch, width, vocab) logits."""
    shapes = []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        shapes.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(model, "forward", spy)
    got = sequence_logprobs(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=3)
    n_scored = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in CONTINUATIONS)
    assert shapes and all(len(shape) == 2 for shape in shapes) and sum(shape[0] for shape in shapes) == n_scored
    assert got == pytest.approx(expected, abs=1e-5)


def test_sequence_logprobs_keep_input_order(model, tokenizer, expected):
    got = sequence_logprobs(model, tokenizer, PROMPTS[::-1], CONTINUATIONS[::-1], batch_size=2)
    assert got == pytest.approx(expected[::-1], abs=1e-5)
    # the same prompt with two continuations: each gets its own likelihood
    two = sequence_logprobs(model, tokenizer, [PROMPTS[0]] * 2, [" Bob", " unanswerable"], batch_size=2)
    assert two == pytest.approx([expected[0], by_hand(model, tokenizer, PROMPTS[0], " unanswerable")], abs=1e-5)
    assert two[0] != pytest.approx(two[1], abs=1e-6)


def test_sequence_logprobs_of_a_float32_model_are_close(tokenizer, expected):
    got = sequence_logprobs(tiny_llama(len(tokenizer)), tokenizer, PROMPTS, CONTINUATIONS, batch_size=3)
    assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_sequence_logprobs_restore_the_training_flag(model, tokenizer, expected, training):
    model.train(training)
    try:
        got = sequence_logprobs(model, tokenizer, PROMPTS[:2], CONTINUATIONS[:2])
        assert model.training is training
        assert got == pytest.approx(expected[:2], abs=1e-5)  # computed in eval mode either way
    finally:
        model.eval()


def test_sequence_logprobs_reject_mismatched_lengths(model, tokenizer):
    with pytest.raises(ValueError, match="continuations"):
        sequence_logprobs(model, tokenizer, PROMPTS, CONTINUATIONS[:-1])


def test_sequence_logprobs_reject_an_empty_continuation(model, tokenizer):
    with pytest.raises(ValueError, match="zero tokens"):
        sequence_logprobs(model, tokenizer, PROMPTS[:2], [" Bob", ""])


def test_sequence_logprobs_of_nothing_is_empty(model, tokenizer):
    assert sequence_logprobs(model, tokenizer, [], []) == []


# ---- no_answer_probs -------------------------------------------------------------------------

EXAMPLES = [
    QAExample(id="q0", title="t", context="Bob went home.", question="Who went home?", answers=("Bob",)),
    QAExample(id="q1", title="t", context="Ann sat.", question="Who stood?", answers=()),
    QAExample(id="q2", title="t", context="It rained.", question="When?", answers=()),
    QAExample(id="q3", title="t", context="Cats purr.", question="What purrs?", answers=("Cats", "cats")),
]


def answer(qid: str, prediction: str) -> Answer:
    return Answer(id=qid, question="?", prediction=prediction, generation=" " + prediction)


class FakeLogprobs:
    """Returns chosen log-likelihoods per (prompt, continuation) and records its calls."""

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table = table
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, prompts: list[str], continuations: list[str], groups: list[str]) -> list[float]:
        assert len(groups) == len(prompts)  # each pair names its passage
        self.calls.append((list(prompts), list(continuations)))
        return [self.table[(p, c)] for p, c in zip(prompts, continuations)]


def table_for(prompter: Prompter, values: dict[str, tuple[float, float]], answers: list[Answer]):
    """{(prompt, continuation): lp} for each answered id, from (lp_na, lp_ans)."""
    ex = {e.id: e for e in EXAMPLES}
    pred = {a.id: a.prediction for a in answers}
    table = {}
    for qid, (lp_na, lp_ans) in values.items():
        prompt = prompter.answer_prompt(ex[qid])
        table[(prompt, prompter.answer_target(""))] = lp_na
        table[(prompt, prompter.answer_target(pred[qid]))] = lp_ans
    return table


def test_empty_predictions_get_one_without_a_likelihood():
    prompter = Prompter()
    answers = [answer("q0", "Bob"), answer("q1", ""), answer("q2", "")]
    fake = FakeLogprobs(table_for(prompter, {"q0": (-3.0, -1.0)}, answers))
    probs = no_answer_probs(EXAMPLES, answers, prompter, fake)
    assert list(probs) == ["q0", "q1", "q2"]
    assert probs["q1"] == 1.0 and probs["q2"] == 1.0
    assert len(fake.calls) == 1
    prompts, continuations = fake.calls[0]
    assert len(prompts) == 2  # two pairs for the one answered question, none for the others
    assert set(prompts) == {prompter.answer_prompt(EXAMPLES[0])}
    assert sorted(continuations) == sorted([" Bob", " " + prompter.no_answer_text])


def test_no_likelihood_is_asked_when_nothing_was_answered():
    fake = FakeLogprobs({})
    probs = no_answer_probs(EXAMPLES, [answer("q1", ""), answer("q2", "")], Prompter(), fake)
    assert probs == {"q1": 1.0, "q2": 1.0}
    assert fake.calls == []


def test_probability_is_the_sigmoid_of_the_likelihood_difference():
    prompter = Prompter(no_answer_text="no answer here")
    answers = [answer("q0", "Bob"), answer("q1", "Ann"), answer("q2", "rain"), answer("q3", "Cats")]
    values = {"q0": (-3.0, -1.0), "q1": (-1.0, -1.0), "q2": (-0.5, -4.0), "q3": (-7.25, -7.0)}
    fake = FakeLogprobs(table_for(prompter, values, answers))
    probs = no_answer_probs(EXAMPLES, answers, prompter, fake)
    assert len(fake.calls) == 1 and len(fake.calls[0][0]) == 8
    assert " no answer here" in fake.calls[0][1]  # the prompter's no-answer text, as SFT trains it
    for qid, (lp_na, lp_ans) in values.items():
        p_na, p_ans = math.exp(lp_na), math.exp(lp_ans)
        assert probs[qid] == pytest.approx(p_na / (p_na + p_ans), rel=1e-12)
    assert probs["q1"] == 0.5
    assert probs["q0"] < 0.5 < probs["q2"]  # the model prefers its answer on q0, no-answer on q2


def test_huge_differences_do_not_overflow():
    prompter = Prompter()
    answers = [answer("q0", "Bob"), answer("q1", "Ann"), answer("q2", "rain"), answer("q3", "Cats")]
    values = {"q0": (-1000.0, 0.0), "q1": (0.0, -1000.0), "q2": (-1e6, -1.0), "q3": (-1.0, -1e6)}
    probs = no_answer_probs(EXAMPLES, answers, prompter, FakeLogprobs(table_for(prompter, values, answers)))
    assert all(0.0 <= p <= 1.0 and math.isfinite(p) for p in probs.values())
    assert probs["q0"] == pytest.approx(0.0, abs=1e-300) and probs["q2"] == pytest.approx(0.0, abs=1e-300)
    assert probs["q1"] == 1.0 and probs["q3"] == 1.0


def test_an_answer_for_an_unknown_question_is_an_error():
    with pytest.raises(ValueError, match="nope"):
        no_answer_probs(EXAMPLES, [answer("q0", "Bob"), answer("nope", "x")], Prompter(), FakeLogprobs({}))


# ---- score with na_probs ---------------------------------------------------------------------


def test_score_passes_na_probs_to_the_official_metric():
    predictions = {"q0": "Bob", "q1": "Ann", "q2": "", "q3": "dogs"}
    na_probs = {"q0": 0.2, "q1": 0.7, "q2": 1.0, "q3": 0.4}
    golds = {ex.id: list(ex.answers) for ex in EXAMPLES}
    official = score_examples(golds, predictions, na_probs)
    got = score(EXAMPLES, predictions, "eval", na_probs=na_probs)
    assert {f"eval/{k}": v for k, v in official.items()} == got
    assert all(f"eval/{k}" in got for k in BEST_KEYS)
    # keeping only q0 (threshold 0.2) drops the wrong "Ann" on unanswerable q1: 3 of 4 right
    assert got["eval/best_exact"] == 75.0 and got["eval/best_exact_thresh"] == 0.2
    assert got["eval/exact"] == 50.0  # the default threshold 1.0 drops nothing


def test_score_without_na_probs_has_no_best_keys():
    got = score(EXAMPLES, {"q0": "Bob", "q1": "", "q2": "", "q3": "Cats"}, "eval")
    assert got["eval/exact"] == 100.0
    assert not any(k.startswith("eval/best_") for k in got)


# ---- end to end ------------------------------------------------------------------------------


def test_no_answer_probs_from_a_real_tiny_model(model, tokenizer):
    prompter = Prompter()
    generated = predict_answers(model, tokenizer, EXAMPLES[:3], prompter, max_new_tokens=4, batch_size=2)
    answers = [*generated, answer("q3", "")]
    # a non-empty prediction on every generated question, whatever the random model said
    answers = [a if a.prediction or a.id == "q3" else answer(a.id, "Bob") for a in answers]
    calls = []

    def logprob_fn(prompts, continuations, groups):
        calls.append(len(prompts))
        return sequence_logprobs(model, tokenizer, prompts, continuations, batch_size=4, groups=groups)

    probs = no_answer_probs(EXAMPLES, answers, prompter, logprob_fn)
    assert calls == [6]
    assert set(probs) == {"q0", "q1", "q2", "q3"}
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert probs["q3"] == 1.0
    ex0 = EXAMPLES[0]
    lp_na = by_hand(model, tokenizer, prompter.answer_prompt(ex0), prompter.answer_target(""))
    lp_ans = by_hand(model, tokenizer, prompter.answer_prompt(ex0), prompter.answer_target(answers[0].prediction))
    assert probs["q0"] == pytest.approx(1.0 / (1.0 + math.exp(lp_ans - lp_na)), abs=1e-6)
    metrics = score(EXAMPLES, {a.id: a.prediction for a in answers}, "eval", na_probs=probs)
    assert all(f"eval/{k}" in metrics for k in BEST_KEYS)
