"""Stage 1, answer prediction: the base model answers the training and validation questions (what the
annotators then judge), by batched greedy generation through the stage cache; each generation is
post-processed into a SQuAD answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from laffi_exp import distributed
from laffi_exp.core.io import write_jsonl
from laffi_exp.core.prompts import Prompter
from laffi_exp.core.records import Answer, QAExample
from laffi_exp.models.generation import generate
from laffi_exp.stages.setup import Setup, setup

SPLITS = {"train": "answers.jsonl", "validation": "val_answers.jsonl"}  # what the annotators judge, and its file


def predict(s: Setup) -> dict[str, list[Answer]]:
    """The base model's answers to the training and validation questions, written to the run dir."""
    answers = {}
    for split, name in SPLITS.items():
        answers[split] = predict_split(s, split)
        if distributed.is_main():
            write_jsonl(s.out / name, answers[split])
    return answers


def predict_split(s: Setup, split: str) -> list[Answer]:
    """The base model's answers to one split's questions."""
    gen = s.cfg.generation
    return predict_answers(
        s.model,
        s.tokenizer,
        s.splits[split],
        s.prompter,
        gen.max_new_tokens,
        gen.batch_size,
        generate_fn=s.generator(s.model, s.model_key, f"answer_{split}"),
    )


def stage1_answers(cfg: DictConfig) -> tuple[dict[str, list[QAExample]], dict[str, list[Answer]]]:
    """The splits and the base model's answers to the training and validation questions (what humans
    are asked to annotate: ``python -m laffi_exp.annotate export``); shared with a run through the
    stage cache."""
    s = setup(cfg)
    return s.splits, {split: predict_split(s, split) for split in SPLITS}


def predict_answers(
    model,
    tokenizer,
    examples: Sequence[QAExample],
    prompter: Prompter,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    max_prompt_tokens: int | None = None,
    desc: str = "answer",
    generate_fn: Callable[[list[str], int, list[str]], list[str]] | None = None,
) -> list[Answer]:
    """Answer every example; ``prediction`` is the SQuAD answer ("" = no answer), ``generation`` the raw text.
    The questions on one passage read it once (``groups``). ``generate_fn(prompts, max_new_tokens, groups)``
    replaces ``generate`` (the pipeline passes a cached one)."""
    prompts = [prompter.answer_prompt(ex) for ex in examples]
    groups = [ex.context for ex in examples]
    if generate_fn is not None:
        generations = generate_fn(prompts, max_new_tokens, groups)
    else:
        generations = generate(
            model, tokenizer, prompts, max_new_tokens, batch_size, max_prompt_tokens, desc, groups=groups
        )
    return [
        Answer(id=ex.id, question=ex.question, prediction=prompter.to_answer(g), generation=g)
        for ex, g in zip(examples, generations)
    ]


def as_predictions(answers: Sequence[Answer]) -> dict[str, str]:
    """The official SQuAD predictions format: question id → answer text."""
    return {a.id: a.prediction for a in answers}
