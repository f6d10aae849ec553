"""One experiment run, start to end: answer prediction, feedback annotation, LoRA fine-tuning and
evaluation, with every artifact written to the run dir. ``run(cfg)`` is what the CLI and tests call."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from laffi_exp import annotate as annotation
from laffi_exp import evaluate
from laffi_exp.answer import as_predictions, predict_answers
from laffi_exp.config import validate
from laffi_exp.data.squad import examples_from_squad
from laffi_exp.data.window import fit_contexts
from laffi_exp.io import atomic_write_text, write_json, write_jsonl
from laffi_exp.train import LoRAFineTuner, PairDataModule

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the flat metrics dict (also written to ``metrics.json``)."""
    started = time.time()
    validate(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = instantiate(cfg.dataset)
    dataset.check()
    source = instantiate(cfg.model.source)
    source.check()
    prompter = instantiate(cfg.prompt, no_answer_phrases=tuple(cfg.prompt.no_answer_phrases))
    human = instantiate(cfg.feedback.human)
    synthetic = instantiate(cfg.feedback.synthetic)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    write_resolved_config(cfg, out / "config.yaml")

    raw = dataset.splits()
    splits = {name: examples_from_squad(data, source=f"{cfg.dataset.name}/{name}") for name, data in raw.items()}
    write_json(out / "eval_data.json", raw["test"], indent=None)  # score again with `python -m laffi_exp.score`
    write_json(out / "chosen_ids.json", {name: [ex.id for ex in exs] for name, exs in splits.items()})
    log.info("Data: %s", ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    base = source.load()
    model, tokenizer = base.model, base.tokenizer
    if getattr(base, "chat_template", False):
        prompter = dataclasses.replace(prompter, wrap=base.format_prompt)
    gen = cfg.generation
    metrics: dict[str, Any] = {}
    # Passages longer than the model's window are shortened (see laffi_exp/data/window.py).
    window = min(cfg.model.max_length, getattr(model.config, "max_position_embeddings", None) or cfg.model.max_length)
    budget = window - gen.max_new_tokens - gen.feedback_max_new_tokens
    for name in splits:
        splits[name], metrics[f"data/shortened_{name}"] = fit_contexts(
            splits[name], tokenizer, prompter, budget, around_answer=name != "test"
        )
    loggers = instantiate_loggers(cfg)
    try:
        # 1. Answer prediction (the base model on the training and validation questions).
        feedback = {}
        if cfg.method.name == "laffi":
            for split, prefix in (("train", ""), ("validation", "val_")):
                answers = predict_answers(model, tokenizer, splits[split], prompter, gen.max_new_tokens, gen.batch_size, desc=f"answer {split}")
                write_jsonl(out / f"{prefix}answers.jsonl", answers)
                # 2. Feedback annotation (hybrid: human share by ratio, synthetic for the rest).
                feedback[split] = annotation.annotate(splits[split], answers, human, synthetic, cfg.feedback.human_ratio, cfg.seed)
                write_jsonl(out / f"{prefix}feedback.jsonl", feedback[split])
            train_fb = feedback["train"]
            metrics["feedback/human_share"] = sum(f.source == "human" for f in train_fb) / len(train_fb)
            metrics["feedback/base_correct_share"] = sum(
                annotation.is_correct(ex, f.prediction) for ex, f in zip(splits["train"], train_fb)
            ) / len(train_fb)

        # 3. Fine-tuning with LoRA (feedback prediction for laffi, gold answers for sft).
        build = instantiate(cfg.method.pairs)
        datamodule = PairDataModule(
            tokenizer,
            build(splits["train"], feedback.get("train", []), prompter),
            build(splits["validation"], feedback.get("validation", []), prompter),
            batch_size=cfg.method.batch_size,
            max_length=cfg.model.max_length,
            seed=cfg.seed,
        )
        metrics["train/examples"] = len(datamodule.train_set)
        metrics["train/dropped_too_long"] = datamodule.train_set.dropped
        module = LoRAFineTuner(model, instantiate(cfg.method.lora, _convert_="all"), instantiate(cfg.method.optimizer), cfg.method.warmup_ratio)
        trainer = instantiate(cfg.trainer, logger=list(loggers.values()), default_root_dir=str(out))
        module.train()  # from_pretrained leaves the model in eval mode
        trainer.fit(module, datamodule=datamodule)
        peft_model = module.model
        peft_model.save_pretrained(out / "adapter", safe_serialization=True)
        write_resolved_config(cfg, out / "adapter" / "config.yaml")
        metrics["train/final_val_loss"] = float(trainer.callback_metrics.get("val/loss", torch.tensor(float("nan"))))

        # 4. Evaluation on held-out questions: the untrained base, then the fine-tuned model.
        test = splits["test"]
        with peft_model.disable_adapter():
            base_answers = predict_answers(peft_model, tokenizer, test, prompter, gen.max_new_tokens, gen.batch_size, desc="base test")
        write_json(out / "base_predictions.json", as_predictions(base_answers))
        metrics.update(evaluate.score(test, as_predictions(base_answers), "base"))
        answers = predict_answers(peft_model, tokenizer, test, prompter, gen.max_new_tokens, gen.batch_size, desc="test")
        write_json(out / "predictions.json", as_predictions(answers))
        write_jsonl(out / "test_generations.jsonl", answers)
        metrics.update(evaluate.score(test, as_predictions(answers), "test"))
        metrics["test/no_answer_predictions"] = sum(a.prediction == "" for a in answers)
        reflections = []
        if cfg.method.name == "laffi" and "reflect" in cfg.evaluation.protocols:
            reflections = evaluate.reflect(peft_model, tokenizer, test, answers, prompter, gen.feedback_max_new_tokens, gen.batch_size)
            reflect_predictions = {r.id: r.prediction for r in reflections}
            write_json(out / "reflect_predictions.json", reflect_predictions)
            write_jsonl(out / "reflections.jsonl", reflections)
            metrics.update(evaluate.score(test, reflect_predictions, "test_reflect"))
            metrics["test_reflect/changed"] = sum(r.prediction != r.first_answer for r in reflections)
        metrics["time/seconds"] = round(time.time() - started, 1)
        write_json(out / "metrics.json", metrics)
        log_results(loggers, metrics, test, base_answers, answers, reflections, cfg.evaluation.num_samples_logged)
    except BaseException:
        finish_loggers(loggers, failed=True)
        raise
    finish_loggers(loggers, failed=False)
    print_summary(metrics, out)
    return metrics


def write_resolved_config(cfg: DictConfig, path: Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def instantiate_loggers(cfg: DictConfig) -> dict[str, Any]:
    """The Lightning loggers of ``cfg.logger``, each given the resolved config as hyper-parameters."""
    loggers = {name: instantiate(node) for name, node in (cfg.get("logger") or {}).items()}
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers.values():
        lg.log_hyperparams(hparams)
    return loggers


def log_results(loggers, metrics, test, base_answers, answers, reflections, num_samples) -> None:
    """Final metrics to every logger; a table of sample predictions (with feedback) to wandb."""
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for lg in loggers.values():
        lg.log_metrics(numeric)
        lg.save()
    if "wandb" in loggers:
        run = loggers["wandb"].experiment
        run.summary.update(numeric)
        reflect_by_id = {r.id: r for r in reflections}
        rows = []
        for ex, b, a in list(zip(test, base_answers, answers))[:num_samples]:
            r = reflect_by_id.get(ex.id)
            rows.append([ex.id, ex.question, ex.gold, b.prediction, a.prediction, r.feedback if r else "", r.prediction if r else ""])
        loggers["wandb"].log_table(
            key="test/samples",
            columns=["id", "question", "gold", "base", "fine_tuned", "predicted_feedback", "reflect"],
            data=rows,
        )


def finish_loggers(loggers, failed: bool) -> None:
    if "wandb" in loggers:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


def print_summary(metrics: dict[str, Any], out: Path) -> None:
    lines = ["", "=" * 64, f"LaFFi run finished in {metrics['time/seconds']:.0f} s"]
    rows = [("base", "base"), ("fine-tuned (direct)", "test"), ("fine-tuned (reflect)", "test_reflect")]
    lines.append(f"{'model':<24}{'EM':>8}{'F1':>8}{'HasAns EM':>11}{'NoAns EM':>10}")
    for label, prefix in rows:
        if f"{prefix}/exact" in metrics:
            lines.append(
                f"{label:<24}{metrics[f'{prefix}/exact']:>8.1f}{metrics[f'{prefix}/f1']:>8.1f}"
                f"{metrics.get(f'{prefix}/HasAns_exact', float('nan')):>11.1f}{metrics.get(f'{prefix}/NoAns_exact', float('nan')):>10.1f}"
            )
    lines += [f"run dir: {out}", "metrics: metrics.json  predictions: predictions.json  adapter: adapter/", "=" * 64]
    print("\n".join(lines), flush=True)
