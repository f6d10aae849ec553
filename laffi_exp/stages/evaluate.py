"""Stage 4, evaluation on held-out questions with SQuAD 2.0 scoring.

Two protocols:
- ``direct`` (the paper's): prompt for the answer (``laffi_exp.stages.answer.predict_answers``), score it.
- ``reflect`` (our extension, for models trained on feedback): the model answers, then predicts the
  feedback on its own answer; where that feedback judges the answer wrong and names a correction
  (an answer, or "no answer"), the correction becomes the answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from laffi_exp import distributed
from laffi_exp.core.io import write_json, write_jsonl
from laffi_exp.core.prompts import Prompter, parse_feedback
from laffi_exp.core.records import Answer, QAExample
from laffi_exp.models.generation import generate
from laffi_exp.scoring.squad_metrics import score_examples
from laffi_exp.stages.answer import as_predictions, predict_answers
from laffi_exp.stages.setup import Setup
from laffi_exp.stages.train import Trained


@dataclass(frozen=True)
class Reflection:
    id: str
    first_answer: str
    feedback: str
    verdict: str
    correction: str | None
    prediction: str


@dataclass
class Evaluated:
    """What stage 4 gives the run: the metrics and, for the loggers' sample table, the answers."""

    metrics: dict[str, Any]  # base/*, test/*, test_reflect/* -> metrics.json
    base_answers: list[Answer]
    answers: list[Answer]
    reflections: list[Reflection] = field(default_factory=list)


def evaluate(s: Setup, trained: Trained) -> Evaluated:
    """The untrained base (adapter disabled), then the fine-tuned model: direct, and reflect for a model
    trained on feedback; predictions and no-answer probabilities written to the run dir."""
    cfg, gen, test, model = s.cfg, s.cfg.generation, s.splits["test"], trained.model

    def answer(model_key: str, label: str, na_label: str) -> tuple[list[Answer], dict[str, float] | None]:
        answers = predict_answers(
            model,
            s.tokenizer,
            test,
            s.prompter,
            gen.max_new_tokens,
            gen.batch_size,
            generate_fn=s.generator(model, model_key, label),
        )
        if not cfg.evaluation.na_probs:
            return answers, None
        logprobs = partial(s.likelihoods, model, model_key, label=na_label)
        return answers, no_answer_probs(test, answers, s.prompter, logprobs)

    with model.disable_adapter():
        base_answers, base_na = answer(s.model_key, "base_test", "base_na_probs")
    answers, test_na = answer(trained.key, "test", "na_probs")
    if distributed.is_main():
        write_json(s.out / "base_predictions.json", as_predictions(base_answers))
        write_json(s.out / "predictions.json", as_predictions(answers))
        write_jsonl(s.out / "test_generations.jsonl", answers)
        if (
            base_na is not None
        ):  # score again: `python -m laffi_exp.score eval_data.json predictions.json --na-prob-file na_probs.json`
            write_json(s.out / "base_na_probs.json", base_na)
            write_json(s.out / "na_probs.json", test_na)
    metrics = {
        **score(test, as_predictions(base_answers), "base", base_na),
        **score(test, as_predictions(answers), "test", test_na),
        "base/no_answer_predictions": sum(a.prediction == "" for a in base_answers),
        "test/no_answer_predictions": sum(a.prediction == "" for a in answers),
    }
    reflections = []
    if cfg.method.trains_on_feedback and "reflect" in cfg.evaluation.protocols:
        reflections = reflect(
            model,
            s.tokenizer,
            test,
            answers,
            s.prompter,
            gen.feedback_max_new_tokens,
            gen.batch_size,
            generate_fn=s.generator(model, trained.key, "reflect"),
        )
        reflect_predictions = {r.id: r.prediction for r in reflections}
        if distributed.is_main():
            write_json(s.out / "reflect_predictions.json", reflect_predictions)
            write_jsonl(s.out / "reflections.jsonl", reflections)
        metrics.update(score(test, reflect_predictions, "test_reflect"))
        metrics["test_reflect/changed"] = sum(r.prediction != r.first_answer for r in reflections)
    return Evaluated(metrics, base_answers, answers, reflections)


def score(
    examples: Sequence[QAExample],
    predictions: dict[str, str],
    prefix: str,
    na_probs: dict[str, float] | None = None,
) -> dict[str, float]:
    """SQuAD 2.0 metrics under ``prefix/`` (``exact``, ``f1``, ``HasAns_exact``, ..., ``total``); with
    ``na_probs`` (question id -> no-answer probability, see :func:`no_answer_probs`) also the official
    ``best_exact``, ``best_exact_thresh``, ``best_f1`` and ``best_f1_thresh``."""
    metrics = score_examples({ex.id: list(ex.answers) for ex in examples}, predictions, na_probs)
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def no_answer_probs(
    examples: Sequence[QAExample],
    answers: Sequence[Answer],
    prompter: Prompter,
    logprob_fn: Callable[[list[str], list[str], list[str]], list[float]],
) -> dict[str, float]:
    """The no-answer probability of each answer (the official SQuAD 2.0 ``--na-prob-file``), by id.

    For a question the model answered (non-empty prediction), the model's own preference between
    the no-answer text and its answer, both after the answer prompt::

        na_prob = P(na) / (P(na) + P(ans)) = sigmoid(lp_na - lp_ans)

    where ``lp_na`` is the log-likelihood of ``prompter.answer_target("")`` (the no-answer text,
    as SFT trains it) and ``lp_ans`` that of ``prompter.answer_target(prediction)``, each summed
    over its tokens given ``prompter.answer_prompt(example)`` (no EOS). For a question the model
    already answered with no-answer (prediction "") the probability is 1.0, with no likelihood.

    ``logprob_fn(prompts, continuations, groups)`` returns those sums (e.g.
    ``laffi_exp.stages.answer.sequence_logprobs``; ``groups`` names each pair's passage, read once); it is
    called once with every pair needed (two per answered question), or not at all when no question was
    answered. Raises ValueError when an answer's id is not among ``examples`` or
    ``logprob_fn`` returns the wrong number of values or a NaN difference.
    """
    by_id = {ex.id: ex for ex in examples}
    unknown = [a.id for a in answers if a.id not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} answer(s) have ids not in examples, e.g. {unknown[0]!r}")
    answered = [a for a in answers if a.prediction]
    prompts: list[str] = []
    continuations: list[str] = []
    groups: list[str] = []
    for a in answered:
        prompt = prompter.answer_prompt(by_id[a.id])
        prompts += [prompt, prompt]
        continuations += [prompter.answer_target(""), prompter.answer_target(a.prediction)]
        groups += [by_id[a.id].context] * 2
    logprobs = list(logprob_fn(prompts, continuations, groups)) if answered else []
    if len(logprobs) != len(prompts):
        raise ValueError(f"logprob_fn returned {len(logprobs)} values for {len(prompts)} (prompt, continuation) pairs")
    probs: dict[str, float] = {}
    for k, a in enumerate(answered):
        diff = float(logprobs[2 * k]) - float(logprobs[2 * k + 1])
        if math.isnan(diff):
            raise ValueError(f"no-answer log-likelihood difference is NaN for {a.id!r}")
        probs[a.id] = _sigmoid(diff)
    return {a.id: probs[a.id] if a.prediction else 1.0 for a in answers}


def _sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def reflect(
    model,
    tokenizer,
    examples: Sequence[QAExample],
    answers: Sequence[Answer],
    prompter: Prompter,
    max_new_tokens: int,
    batch_size: int,
    generate_fn: Callable[[list[str], int, list[str]], list[str]] | None = None,
) -> list[Reflection]:
    """Predict feedback on each of the model's own answers and apply the correction it names."""
    by_id = {a.id: a for a in answers}
    prompts = [prompter.feedback_prompt(ex, by_id[ex.id].prediction) for ex in examples]
    groups = [ex.context for ex in examples]  # the questions on one passage read it once
    if generate_fn is not None:
        texts = generate_fn(prompts, max_new_tokens, groups)
    else:
        texts = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc="reflect", groups=groups)
    out = []
    for ex, text in zip(examples, texts):
        first = by_id[ex.id].prediction
        text = text.strip().split("\n", 1)[0].strip()
        verdict, correction = parse_feedback(text)
        out.append(Reflection(ex.id, first, text, verdict, correction, reflected_answer(first, verdict, correction)))
    return out


def reflected_answer(first_answer: str, verdict: str, correction: str | None) -> str:
    """The reflect rule: keep the first answer unless the feedback judges it wrong and names a
    correction ("" = the question has no answer)."""
    return correction if verdict in ("incorrect", "no_answer") and correction is not None else first_answer
