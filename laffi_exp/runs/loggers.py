"""What a run tells its loggers (``logger`` config group: CSV, wandb) and the terminal: the resolved config
as hyper-parameters, the final metrics, a table of sample predictions, and the closing summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from laffi_exp.runs import sweep


def instantiate_loggers(cfg: DictConfig) -> dict[str, Any]:
    """The Lightning loggers of ``cfg.logger``, each given the resolved config as hyper-parameters
    (rank 0's alone in a distributed run: other ranks train with no logger but the history)."""
    nodes = OmegaConf.to_container(cfg.get("logger") or {}, resolve=True)
    if "wandb" in nodes and nodes["wandb"].get("group") is None and sweep.sweep_dir() is not None:
        nodes["wandb"]["group"] = sweep.sweep_dir().name  # one wandb group per sweep
    loggers = {name: instantiate(node) for name, node in nodes.items()}
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers.values():
        lg.log_hyperparams(hparams)
    return loggers


def log_results(loggers, metrics, summary, test, evaluated, num_samples) -> None:
    """Final metrics to every logger; a table of sample predictions (with feedback) to wandb."""
    base_answers, answers, reflections = evaluated.base_answers, evaluated.answers, evaluated.reflections
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for lg in loggers.values():
        lg.log_metrics(numeric)
        lg.save()
    if "wandb" in loggers:
        run = loggers["wandb"].experiment
        run.summary.update(numeric)
        run.summary.update(summary)
        reflect_by_id = {r.id: r for r in reflections}
        rows = []
        for ex, b, a in list(zip(test, base_answers, answers))[:num_samples]:
            r = reflect_by_id.get(ex.id)
            rows.append(
                [
                    ex.id,
                    ex.question,
                    ex.gold,
                    b.prediction,
                    a.prediction,
                    r.feedback if r else "",
                    r.prediction if r else "",
                ]
            )
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
    best = "base/best_f1" in metrics  # evaluation.na_probs: F1 at the best no-answer threshold
    lines.append(
        f"{'model':<24}{'EM':>8}{'F1':>8}{'HasAns EM':>11}{'NoAns EM':>10}" + (f"{'best F1':>9}" if best else "")
    )
    for label, prefix in rows:
        if f"{prefix}/exact" in metrics:
            lines.append(
                f"{label:<24}{metrics[f'{prefix}/exact']:>8.1f}{metrics[f'{prefix}/f1']:>8.1f}"
                f"{metrics.get(f'{prefix}/HasAns_exact', float('nan')):>11.1f}"
                f"{metrics.get(f'{prefix}/NoAns_exact', float('nan')):>10.1f}"
                + (
                    f"{metrics[f'{prefix}/best_f1']:>9.1f}"
                    if f"{prefix}/best_f1" in metrics
                    else f"{'-':>9}"
                    if best
                    else ""
                )
            )
    files = (
        "metrics: metrics.json  predictions: predictions.json"
        + ("  na_probs.json" if best else "")
        + "  adapter: adapter/"
    )
    lines += [f"run dir: {out}", files, "=" * 64]
    print("\n".join(lines), flush=True)
