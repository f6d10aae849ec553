"""One experiment run, start to end: answer prediction, feedback annotation, LoRA fine-tuning and
evaluation, with every artifact written to the run dir. ``run(cfg)`` is what the CLI and tests call.

Stage outputs that cost model time (generations, trained adapters) go through a content-addressed
cache (``laffi_exp.cache``) keyed by exactly their inputs, so the jobs of a sweep share them: stage 1
runs once for every ratio and seed, SFT trains once per seed, the base is evaluated once. A run dir
that already holds a finished run of the same config is not run again (``laffi_exp.sweep``).

Launched as several processes (``torchrun`` or ``srun``, with ``trainer=ddp|ddp_cpu|fsdp``), every
rank runs this same program: each generates its share of every batch of prompts and all gather the
results, Lightning's DDP or FSDP trains, and rank 0 alone annotates, writes files, logs and touches
the cache (``laffi_exp.distributed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from laffi_exp import annotate as annotation
from laffi_exp import distributed, evaluate, sweep
from laffi_exp.answer import as_predictions, batches, generate, predict_answers, sequence_logprobs
from laffi_exp.attention import analysis as attention
from laffi_exp.cache import StageCache, code_versions, text_digest, weights_fingerprint
from laffi_exp.cache import key as cache_key
from laffi_exp.config import validate
from laffi_exp.data.squad import examples_from_squad
from laffi_exp.data.window import fit_contexts
from laffi_exp.errors import ConfigError
from laffi_exp.feedback_report import feedback_report, flatten
from laffi_exp.io import atomic_write_text, read_json, read_jsonl, write_json, write_jsonl
from laffi_exp.prompts import Prompter
from laffi_exp.records import Answer, Feedback, QAExample
from laffi_exp.train import (FSDP_SCHEME, HistoryLogger, LoRAFineTuner, PairDataModule, TrainingCheckpoints, gather_adapter, load_adapter,
                             prepare_fsdp, rng_state, save_adapter, set_rng_state)

log = logging.getLogger(__name__)

# Trainer keys that change no trained weight (left out of the training cache key).
_DISPLAY_ONLY = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps", "logger", "default_root_dir")


@dataclass
class Setup:
    """What every stage reads: the config, the run dir, the data and the loaded base model."""

    cfg: DictConfig
    out: Path
    prompter: Prompter
    splits: dict[str, list[QAExample]]
    model: Any
    tokenizer: Any
    model_key: str  # identifies the base weights (cache keys of everything generated from them)
    cache: StageCache
    annotators: tuple[Any, Any]  # (human pool, synthetic pool), for laffi
    source: Any  # what loaded the base model (loads it again after FSDP training)
    rng: dict[str, Any]  # the random state after set-up, restored before the adapter is built
    metrics: dict[str, Any] = field(default_factory=dict)  # -> metrics.json and every logger
    summary: dict[str, Any] = field(default_factory=dict)  # -> the wandb summary only (e.g. the feedback report)


def setup(cfg: DictConfig) -> Setup:
    """Validate the config and every input, then read the data and load the base model."""
    validate(cfg)
    out = Path(cfg.paths.output_dir)
    dataset = instantiate(cfg.dataset)
    dataset.check()
    source = instantiate(cfg.model.source)
    source.check()
    prompter = instantiate(cfg.prompt, no_answer_phrases=tuple(cfg.prompt.no_answer_phrases))
    annotators = (None, None)
    if cfg.method.name == "laffi":
        annotators = (instantiate(cfg.feedback.human), instantiate(cfg.feedback.synthetic))
        distributed.on_main(_check_annotators, annotators)  # rank 0 alone annotates
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    with distributed.main_first():  # a download lands once
        raw = dataset.splits()
    splits = {name: examples_from_squad(data, source=f"{cfg.dataset.name}/{name}") for name, data in raw.items()}
    prompter, shot_ids = prompter.with_shots(splits["train"])  # a few-shot answer prompt: shots from train only
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval_data.json", raw["test"], indent=None)  # score again with `python -m laffi_exp.score`
        chosen = {name: [ex.id for ex in exs] for name, exs in splits.items()}
        write_json(out / "chosen_ids.json", {**chosen, "shots": shot_ids} if shot_ids else chosen)
    log.info("Data: %s", ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    with distributed.main_first():  # the embedded base is built once
        base = source.load()
    model, tokenizer = base.model, base.tokenizer
    on_device(model, cfg)
    if getattr(base, "chat_template", False):
        prompter = dataclasses.replace(prompter, wrap=base.format_prompt)
    metrics: dict[str, Any] = {}
    # Passages longer than the model's window are shortened (see laffi_exp/data/window.py).
    gen = cfg.generation
    window = min(cfg.model.max_length, getattr(model.config, "max_position_embeddings", None) or cfg.model.max_length)
    budget = window - gen.max_new_tokens - gen.feedback_max_new_tokens
    _check_window(splits, tokenizer, prompter, window, budget)
    for name in splits:
        splits[name], metrics[f"data/shortened_{name}"] = fit_contexts(
            splits[name], tokenizer, prompter, budget, around_answer=name != "test"
        )
    model_spec = {
        "model": OmegaConf.to_container(cfg.model.source, resolve=True),
        "weights": getattr(base, "fingerprint", None) or weights_fingerprint(base.path, cfg.model.source.get("cache_dir")),
        "code": code_versions(),
    }
    model_key = cache_key(model_spec)
    cache = StageCache(cfg.cache.dir, enabled=cfg.cache.enabled)
    # The adapter's initialisation draws from the global RNG; its cache key assumes the seed alone decides
    # it, so it must not depend on what stages 1 and 2 drew (an annotator model loaded on a cache miss).
    rng = rng_state()
    return Setup(cfg, out, prompter, splits, model, tokenizer, model_key, cache, annotators, source, rng, metrics)


def _check_window(splits, tokenizer, prompter, window: int, budget: int) -> None:
    """The prompt template and generation budgets must leave room for a passage in the model's window."""
    ex = next((ex for split in splits.values() for ex in split), None)
    if ex is None:
        return
    overhead = len(tokenizer(prompter.longest_prompt(dataclasses.replace(ex, context="")))["input_ids"])
    if budget < overhead + 8:
        raise ConfigError(
            f"model.max_length: {window} tokens leave {budget} for a prompt after generation.max_new_tokens and "
            f"generation.feedback_max_new_tokens, and the prompt without its passage takes {overhead}: "
            f"expected at least {overhead + 8 + window - budget}"
        )


def generation_device(cfg: DictConfig) -> torch.device:
    """Where generation runs: this rank's GPU when the trainer uses GPUs and one is there, else the CPU."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def uses_fsdp(cfg: DictConfig) -> bool:
    """Whether the trainer shards the model with FSDP (trainer=fsdp or fsdp_cpu)."""
    return "FSDPStrategy" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default=""))


def on_device(model, cfg: DictConfig) -> None:
    """Move the model to the generation device. A 4-bit model is placed on its GPU by its loader; it is
    moved back only after Lightning's teardown left it on the CPU (bitsandbytes >= 0.43.2 moves 4-bit
    weights)."""
    device = generation_device(cfg)
    if getattr(model, "is_loaded_in_4bit", False):
        if device.type == "cuda" and next(model.parameters()).device.type != "cuda":
            model.to(device)
        return
    model.to(device)


def _check_annotators(annotators) -> None:
    for annotator in annotators:  # a human file is read, an endpoint is reached, before any model work
        if hasattr(annotator, "check"):
            annotator.check()


def generations(s: Setup, model, model_key: str, prompts: list[str], max_new_tokens: int, groups: list[str] | None = None,
                label: str = "generate") -> list[str]:
    """``answer.generate`` through the stage cache: the same model, prompts and settings are generated
    once. With several ranks each generates its share of the batches, and every rank gets all texts."""
    gen = s.cfg.generation
    spec = {"model": model_key, "prompts": text_digest(prompts), "n": len(prompts), "max_new_tokens": max_new_tokens,
            "batch_size": gen.batch_size, "groups": text_digest(groups) if groups else None}

    def work(mine: list[int]) -> list[str]:
        return generate(model, s.tokenizer, [prompts[i] for i in mine], max_new_tokens, gen.batch_size, desc=label,
                        groups=[groups[i] for i in mine] if groups else None, shared=[shared[i] for i in mine])

    def compute() -> list[str]:
        nonlocal shared
        plan, shared = batches(s.tokenizer, prompts, gen.batch_size, groups)
        texts = in_chunks(s, partial_dir, plan, work, len(prompts), label)
        if distributed.world_size() > 1:
            log.info("Generation %s: rank %d/%d generated %d of %d prompts", label, distributed.rank(), distributed.world_size(),
                     len(distributed.my_share(plan)), len(prompts))
        return texts

    def write(folder: Path, texts: list[str]) -> None:
        write_jsonl(folder / "generations.jsonl", [{"text": t} for t in texts])

    def read(entry: Path) -> list[str]:
        return [row["text"] for row in read_jsonl(entry / "generations.jsonl")]

    shared: list[int] = []
    partial_dir = _partial_dir(s, "generations", spec)
    texts = s.cache.get_or_compute("generations", spec, compute, write, read, label=label)
    _drop(partial_dir)
    return texts


def _partial_dir(s: Setup, stage: str, spec: dict[str, Any]) -> Path | None:
    """Where a generation stage commits its finished chunks (``cache.chunk_batches`` batches per rank
    each) until its cache entry is written: tied to the entry's key and to the chunking."""
    every = int(s.cfg.cache.get("chunk_batches", 0) or 0)
    if every <= 0 or not s.cache.enabled:
        return None
    return Path(s.cfg.cache.dir) / "partial" / stage / f"{s.cache.key(spec)}-{every * distributed.world_size()}"


def _drop(folder: Path | None) -> None:
    if folder is not None and distributed.is_main():  # the stage's entry is in the cache: its chunks go
        shutil.rmtree(folder, ignore_errors=True)


def in_chunks(s: Setup, folder: Path | None, plan: list[list[int]], work, n: int, label: str) -> list[Any]:
    """``work(indices)`` over this rank's whole batches of ``plan``, gathered in item order on every rank,
    a chunk at a time: each chunk of ``cache.chunk_batches`` batches per rank is committed to ``folder``
    (rank 0 writes it atomically) as it finishes, and a stage killed midway starts again at its first
    uncommitted chunk. The batches are the plan's whatever the chunking, so the results are the same; a
    chunk holds a whole number of batches per rank, so each batch goes to the rank ``my_share(plan)``
    gives it."""
    out: list[Any] = [None] * n
    if folder is None:
        mine = distributed.my_share(plan)
        return distributed.gather_in_order(mine, work(mine), n)
    size = int(s.cfg.cache.chunk_batches) * distributed.world_size()
    chunks = [plan[i : i + size] for i in range(0, len(plan), size)]
    done = distributed.on_main(lambda: sorted(int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.json")) if folder.is_dir() else [])
    if done:
        log.info("%s: %d of %d chunks already done (%s)", label, len(done), len(chunks), folder)
    for c, chunk in enumerate(chunks):
        indices = [i for batch in chunk for i in batch]
        if c in done:
            results = read_json(folder / f"chunk-{c:05d}.json")["results"]
        else:
            mine = distributed.my_share(chunk)
            at = {i: k for k, i in enumerate(indices)}
            results = distributed.gather_in_order([at[i] for i in mine], work(mine), len(indices))
            if distributed.is_main():
                write_json(folder / f"chunk-{c:05d}.json", {"indices": indices, "results": results}, indent=None)
        for i, value in zip(indices, results):
            out[i] = value
    return out


def likelihoods(s: Setup, model, model_key: str, prompts: list[str], continuations: list[str], groups: list[str] | None = None,
                label: str = "likelihood") -> list[float]:
    """``answer.sequence_logprobs`` through the stage cache, shared between ranks like ``generations``."""
    batch_size = s.cfg.generation.batch_size
    pairs = [p + "\x00" + c for p, c in zip(prompts, continuations)]
    spec = {"model": model_key, "pairs": text_digest(pairs), "n": len(pairs), "batch_size": batch_size,
            "groups": text_digest(groups) if groups else None}

    def work(mine: list[int]) -> list[float]:
        return sequence_logprobs(model, s.tokenizer, [prompts[i] for i in mine], [continuations[i] for i in mine], batch_size,
                                 groups=[groups[i] for i in mine] if groups else None, shared=[shared[i] for i in mine])

    def compute() -> list[float]:
        nonlocal shared
        plan, shared = batches(s.tokenizer, prompts, batch_size, groups)  # the batches sequence_logprobs forms
        return in_chunks(s, partial_dir, plan, work, len(pairs), label)

    def write(folder: Path, values: list[float]) -> None:
        write_json(folder / "logprobs.json", values, indent=None)

    def read(entry: Path) -> list[float]:
        return read_json(entry / "logprobs.json")

    shared: list[int] = []
    partial_dir = _partial_dir(s, "likelihoods", spec)
    values = s.cache.get_or_compute("likelihoods", spec, compute, write, read, label=label)
    _drop(partial_dir)
    return values


def _generator(s: Setup, model, model_key: str, label: str):
    return partial(generations, s, model, model_key, label=label)


# -- 1. Answer prediction ---------------------------------------------------------------------------
def predict(s: Setup, split: str) -> list[Answer]:
    """The base model's answers to one split's questions."""
    gen = s.cfg.generation
    return predict_answers(
        s.model, s.tokenizer, s.splits[split], s.prompter, gen.max_new_tokens, gen.batch_size,
        generate_fn=_generator(s, s.model, s.model_key, f"answer_{split}"),
    )


def stage1_answers(cfg: DictConfig) -> tuple[dict[str, list[QAExample]], dict[str, list[Answer]]]:
    """The splits and the base model's answers to the training and validation questions (what humans
    are asked to annotate); shared with ``run`` through the stage cache."""
    s = setup(cfg)
    return s.splits, {split: predict(s, split) for split in ("train", "validation")}


# -- 2. Feedback annotation -------------------------------------------------------------------------
def annotate(s: Setup, answers: dict[str, list[Answer]]) -> dict[str, list[Feedback]]:
    """Hybrid feedback on the base's answers; ``feedback_report.json`` says how good each pool is.
    Rank 0 alone runs it in a distributed run (an LLM annotator costs, a response cache is written)."""
    cfg = s.cfg
    human, synthetic = s.annotators
    human_time = None
    if hasattr(human, "check_against"):  # a file of human feedback: stale or missing rows are refused here
        examples = s.splits["train"] + s.splits["validation"]
        chosen = annotation.human_ids_by_split([s.splits["train"], s.splits["validation"]], cfg.feedback.human_ratio, cfg.seed)
        check = human.check_against(examples, answers["train"] + answers["validation"], chosen)
        (log.warning if check.unknown else log.info)(check.summary())
        human_time = human.time_report(check.used) if hasattr(human, "time_report") else None  # rows with `seconds`
    feedback, report, fallback = {}, {}, 0
    for split, prefix in (("train", ""), ("validation", "val_")):
        result = annotation.annotate(
            s.splits[split], answers[split], human, synthetic, cfg.feedback.human_ratio, cfg.seed, overlap_ratio=cfg.feedback.overlap_ratio
        )
        feedback[split], fallback = result.feedback, fallback + result.fallback
        write_jsonl(s.out / f"{prefix}feedback.jsonl", result.feedback)
        if result.overlap:
            write_jsonl(s.out / f"{prefix}overlap_feedback.jsonl", [{"human": dataclasses.asdict(h), "synthetic": dataclasses.asdict(y)} for h, y in result.overlap])
        report[split] = feedback_report(s.splits[split], result.feedback, result.overlap)
    if human_time:
        report["human_time"] = human_time  # time per human-annotated example used, train and validation
    write_json(s.out / "feedback_report.json", report)
    s.summary.update(flatten(report["train"], prefix="feedback_report"))
    train_fb = feedback["train"]
    s.metrics["feedback/human_share"] = sum(f.source == "human" for f in train_fb) / len(train_fb)
    s.metrics["feedback/human_fallback"] = fallback
    s.metrics["feedback/base_correct_share"] = sum(
        annotation.is_correct(ex, f.prediction) for ex, f in zip(s.splits["train"], train_fb)
    ) / len(train_fb)
    return feedback


# -- 3. Fine-tuning with LoRA -----------------------------------------------------------------------
def fine_tune(s: Setup, feedback: dict[str, list[Feedback]], loggers: dict[str, Any]) -> tuple[Any, str]:
    """Train the LoRA adapter (feedback prediction for laffi, gold answers for sft); returns the peft
    model and the adapter's cache key. A cached adapter is loaded and its loss curves replayed."""
    cfg = s.cfg
    build_pairs = instantiate(cfg.method.pairs)
    train_pairs = build_pairs(s.splits["train"], feedback.get("train", []), s.prompter)
    val_pairs = build_pairs(s.splits["validation"], feedback.get("validation", []), s.prompter)
    trainer_cfg = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in _DISPLAY_ONLY}
    spec = {
        "model": s.model_key,
        "train": text_digest(t for p in train_pairs for t in (p.prompt, p.target)),
        "validation": text_digest(t for p in val_pairs for t in (p.prompt, p.target)),
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "max_length": cfg.model.max_length,
        "micro_batch_tokens": cfg.model.get("micro_batch_tokens"),  # the same gradient up to float rounding
        "seed": cfg.seed,
        "trainer": trainer_cfg,
        "world_size": distributed.world_size(),  # the global batch
        "device": generation_device(cfg).type,
    }
    if uses_fsdp(cfg):
        spec["fsdp_scheme"] = FSDP_SCHEME  # how laffi_exp sets FSDP up (units, precision): see train.prepare_fsdp

    def compute() -> dict[str, Any]:  # on every rank: Lightning's DDP/FSDP finds the process group started
        datamodule = PairDataModule(s.tokenizer, train_pairs, val_pairs, cfg.method.batch_size, cfg.model.max_length, cfg.seed,
                                    group_by_length=cfg.method.group_by_length)
        lora = instantiate(cfg.method.lora, _convert_="all")
        set_rng_state(s.rng)
        module = LoRAFineTuner(s.model, lora, instantiate(cfg.method.optimizer), cfg.method.warmup_ratio,
                               micro_batch_tokens=cfg.model.get("micro_batch_tokens"))
        history = HistoryLogger()
        trainer = instantiate(cfg.trainer, logger=[*loggers.values(), history], default_root_dir=str(s.out),
                              callbacks=[checkpoints] if checkpoints else None)
        sharded = isinstance(trainer.strategy, pl.strategies.FSDPStrategy)
        if sharded:
            prepare_fsdp(trainer.strategy, module.model, trainer.precision)
        module.train()  # from_pretrained leaves the model in eval mode
        resume = checkpoints.resume_from() if checkpoints else None
        if resume:
            log.info("Training: resuming from %s", resume)
        with warnings.catch_warnings():  # the data position comes back through the sampler (PairDataModule)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        result = {"history": history.rows, "train": {
            "train/examples": len(datamodule.train_set),
            "train/dropped_too_long": datamodule.train_set.dropped,
            "train/final_val_loss": float(trainer.callback_metrics.get("val/loss", torch.tensor(float("nan")))),
        }}
        if sharded:  # FSDP flattened and sharded the model in place: rebuild it whole, with the trained adapter
            adapter = gather_adapter(trainer.strategy, module.model)
            datamodule.trainer = None  # (Lightning's back-reference) so that nothing holds the sharded model
            del trainer, module, datamodule
            s.model = None
            s.model = unsharded(s, lora, adapter)
        else:
            s.model = module.model  # the trained peft model, for evaluation in this process
        return result

    def write(folder: Path, result: dict[str, Any]) -> None:
        save_adapter(s.model, folder / "adapter")
        write_jsonl(folder / "history.jsonl", result["history"])
        write_json(folder / "train.json", result["train"])

    def read(entry: Path) -> dict[str, Any]:
        return {"history": list(read_jsonl(entry / "history.jsonl")), "train": read_json(entry / "train.json")}

    checkpoints = training_checkpoints(cfg, s.cache.key(spec))
    result = s.cache.get_or_compute("adapters", spec, compute, write, read, label="train")
    _drop(checkpoints.folder if checkpoints else None)  # the adapter is in the cache (or this run needs none)
    if s.cache.events["train"]["hit"]:
        from peft import PeftModel

        entry = s.cache.entry("adapters", spec)
        log.info("Training: reusing the adapter trained with the same inputs (%s)", entry)
        s.model = PeftModel.from_pretrained(s.model, entry / "adapter")  # every rank (a shared cache dir)
        for row in result["history"]:  # the cached run's loss curves, for this run's loggers
            for lg in loggers.values():
                lg.log_metrics(row["metrics"], step=row["step"])
    s.metrics.update(result["train"])
    on_device(s.model, cfg)  # Lightning leaves a trained model on the CPU
    if distributed.is_main():
        save_adapter(s.model, s.out / "adapter")
        write_resolved_config(cfg, s.out / "adapter" / "config.yaml")
    return s.model, s.cache.key(spec)


def training_checkpoints(cfg: DictConfig, key: str) -> TrainingCheckpoints | None:
    """The resume points of the training run with cache key ``key`` (``cache.checkpoint_every`` steps
    apart, under ``cache.dir/checkpoints/<key>``), or None where they are off or not supported yet."""
    every = int(cfg.cache.get("checkpoint_every", 0) or 0)
    if every <= 0 or not cfg.cache.enabled:
        return None
    one_process = distributed.world_size() == 1 and "strategy" not in cfg.trainer and cfg.trainer.get("devices", 1) in (1, "1")
    if not one_process or cfg.method.get("group_by_length") is False:
        log.info("Training checkpoints: written in one process with length-grouped batches only (not this run)")
        return None
    return TrainingCheckpoints(Path(cfg.cache.dir) / "checkpoints" / key, every)


def unsharded(s: Setup, lora_config, adapter: dict[str, torch.Tensor]):
    """The base model loaded again, with the adapter weights gathered from FSDP's shards (every rank)."""
    import gc

    from peft import get_peft_model

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the sharded model's memory, before a whole copy arrives
    model = get_peft_model(s.source.load().model, lora_config)
    load_adapter(model, adapter)
    log.info("FSDP: gathered %d adapter tensors onto the reloaded base model", len(adapter))
    return model


# -- 4. Evaluation on held-out questions --------------------------------------------------------------
def evaluate_all(s: Setup, peft_model, adapter_key: str) -> tuple[list[Answer], list[Answer], list[evaluate.Reflection]]:
    """The untrained base (adapter disabled), then the fine-tuned model: direct, and reflect for laffi."""
    cfg, gen, test = s.cfg, s.cfg.generation, s.splits["test"]

    def na_probs(answers: list[Answer], model_key: str, label: str) -> dict[str, float] | None:
        if not cfg.evaluation.na_probs:
            return None
        logprobs = partial(likelihoods, s, peft_model, model_key, label=label)
        return evaluate.no_answer_probs(test, answers, s.prompter, logprobs)

    with peft_model.disable_adapter():
        base_answers = predict_answers(
            peft_model, s.tokenizer, test, s.prompter, gen.max_new_tokens, gen.batch_size,
            generate_fn=_generator(s, peft_model, s.model_key, "base_test"),
        )
        base_na = na_probs(base_answers, s.model_key, "base_na_probs")
    answers = predict_answers(
        peft_model, s.tokenizer, test, s.prompter, gen.max_new_tokens, gen.batch_size,
        generate_fn=_generator(s, peft_model, adapter_key, "test"),
    )
    test_na = na_probs(answers, adapter_key, "na_probs")
    if distributed.is_main():
        write_json(s.out / "base_predictions.json", as_predictions(base_answers))
        write_json(s.out / "predictions.json", as_predictions(answers))
        write_jsonl(s.out / "test_generations.jsonl", answers)
        if base_na is not None:  # score again with `python -m laffi_exp.score eval_data.json predictions.json --na-prob-file na_probs.json`
            write_json(s.out / "base_na_probs.json", base_na)
            write_json(s.out / "na_probs.json", test_na)
    s.metrics.update(evaluate.score(test, as_predictions(base_answers), "base", base_na))
    s.metrics.update(evaluate.score(test, as_predictions(answers), "test", test_na))
    s.metrics["base/no_answer_predictions"] = sum(a.prediction == "" for a in base_answers)
    s.metrics["test/no_answer_predictions"] = sum(a.prediction == "" for a in answers)
    reflections = []
    if cfg.method.name == "laffi" and "reflect" in cfg.evaluation.protocols:
        reflections = evaluate.reflect(
            peft_model, s.tokenizer, test, answers, s.prompter, gen.feedback_max_new_tokens, gen.batch_size,
            generate_fn=_generator(s, peft_model, adapter_key, "reflect"),
        )
        reflect_predictions = {r.id: r.prediction for r in reflections}
        if distributed.is_main():
            write_json(s.out / "reflect_predictions.json", reflect_predictions)
            write_jsonl(s.out / "reflections.jsonl", reflections)
        s.metrics.update(evaluate.score(test, reflect_predictions, "test_reflect"))
        s.metrics["test_reflect/changed"] = sum(r.prediction != r.first_answer for r in reflections)
    return base_answers, answers, reflections


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the flat metrics dict (also written to ``metrics.json``)."""
    started = time.time()
    validate(cfg)
    out = Path(cfg.paths.output_dir)
    if uses_fsdp(cfg) and OmegaConf.select(cfg, "model.load_in_4bit", default=False):
        raise ConfigError("trainer=fsdp with model.load_in_4bit: FSDP does not shard 4-bit weights; use trainer=ddp for QLoRA")
    join_ranks(cfg)
    if cfg.model.get("micro_batch_tokens") and distributed.world_size() > 1:
        raise ConfigError("model.micro_batch_tokens: micro-batches run in one process only; under DDP/FSDP set "
                          "model.micro_batch_tokens=null and size method.batch_size per rank")
    done = distributed.on_main(sweep.finished_metrics, cfg, out)  # a finished cell of a re-run sweep: nothing to do
    if done is not None:
        if distributed.is_main():
            attention.after_run(cfg, out)  # analysis.attention=true: a finished cell gets the analysis it lacks
        return done
    with sweep.claim(out) if distributed.is_main() else contextlib.nullcontext():  # one job per folder
        return _run(cfg, out, started)


def _run(cfg: DictConfig, out: Path, started: float) -> dict[str, Any]:
    s = setup(cfg)
    main = distributed.is_main()  # the one rank that writes files and has loggers
    if main:
        write_resolved_config(cfg, out / "config.yaml")
        sweep.mark(cfg, out, "running")
    loggers = instantiate_loggers(cfg) if main else {}
    try:
        answers: dict[str, list[Answer]] = {}
        feedback: dict[str, list[Feedback]] = {}
        if cfg.method.name == "laffi":
            for split, prefix in (("train", ""), ("validation", "val_")):
                answers[split] = predict(s, split)
                if main:
                    write_jsonl(out / f"{prefix}answers.jsonl", answers[split])
            feedback = distributed.on_main(annotate, s, answers)
        peft_model, adapter_key = fine_tune(s, feedback, loggers)
        base_answers, test_answers, reflections = evaluate_all(s, peft_model, adapter_key)
        s.metrics["time/seconds"] = round(time.time() - started, 1)
        metrics = distributed.from_main(s.metrics)  # rank 0's: it alone annotated
        if main:
            write_json(out / "metrics.json", metrics)
            log_results(loggers, metrics, s.summary, s.splits["test"], base_answers, test_answers, reflections, cfg.evaluation.num_samples_logged)
    except BaseException:
        if main:
            finish_loggers(loggers, failed=True)
            sweep.mark(cfg, out, "failed", stages=s.cache.events)
        raise
    if main:
        finish_loggers(loggers, failed=False)
        sweep.mark(cfg, out, "finished", stages=s.cache.events, seconds=metrics["time/seconds"])
        print_summary(metrics, out)
        attention.after_run(cfg, out, peft_model, s.tokenizer, s.prompter)  # analysis.attention=true
    return metrics


def join_ranks(cfg: DictConfig) -> None:
    """Join the other ranks of a torchrun/srun launch (nothing in a single process), and check the
    launch against the trainer: Lightning must find all its ranks running, as it would start missing
    ones itself only at ``fit`` (after stage 1), and every rank must write to the same run dir."""
    distributed.init()
    world = distributed.world_size()
    if world > 1:
        if sweep.sweep_dir() is not None:
            raise ConfigError("hydra.mode: a sweep is not run under torchrun/srun (each job would start a sweep); launch one distributed run per cell")
        log.info("Distributed run: rank %d of %d (%s)", distributed.rank(), world, torch.distributed.get_backend())
        distributed.check_agree("paths.output_dir (hydra.run.dir)", str(Path(cfg.paths.output_dir).resolve()))
        start_method = OmegaConf.select(cfg, "trainer.strategy.start_method", default="popen")
        if start_method != "popen":
            raise ConfigError(f"trainer.strategy.start_method: every rank is a process already (launched by torchrun or srun); expected popen, got {start_method!r}")
    elif "strategy" not in cfg.trainer:
        return  # one process, one device
    # Lightning's own count (devices=-1, auto, ...), from a trainer that sets no torch flag and whose
    # device lines are not shown (the trainer that fits shows them).
    quiet = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        trainer = instantiate(cfg.trainer, logger=False, deterministic=None, benchmark=None)
    finally:
        quiet.setLevel(level)
    processes = trainer.num_devices * trainer.num_nodes  # (trainer.world_size is the launcher's, under one)
    if processes != world:
        raise ConfigError(
            f"trainer: runs {processes} processes (devices x num_nodes) but {world} were launched; every "
            f"stage runs on every rank, so launch them all at the start: torchrun --nproc_per_node={trainer.num_devices} "
            f"--nnodes={trainer.num_nodes} -m laffi_exp ... (or srun under SLURM; see laffi_exp/conf/trainer/ddp.yaml)"
        )


def write_resolved_config(cfg: DictConfig, path: Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


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


def log_results(loggers, metrics, summary, test, base_answers, answers, reflections, num_samples) -> None:
    """Final metrics to every logger; a table of sample predictions (with feedback) to wandb."""
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
    best = "base/best_f1" in metrics  # evaluation.na_probs: F1 at the best no-answer threshold
    lines.append(f"{'model':<24}{'EM':>8}{'F1':>8}{'HasAns EM':>11}{'NoAns EM':>10}" + (f"{'best F1':>9}" if best else ""))
    for label, prefix in rows:
        if f"{prefix}/exact" in metrics:
            lines.append(
                f"{label:<24}{metrics[f'{prefix}/exact']:>8.1f}{metrics[f'{prefix}/f1']:>8.1f}"
                f"{metrics.get(f'{prefix}/HasAns_exact', float('nan')):>11.1f}{metrics.get(f'{prefix}/NoAns_exact', float('nan')):>10.1f}"
                + (f"{metrics[f'{prefix}/best_f1']:>9.1f}" if f"{prefix}/best_f1" in metrics else f"{'-':>9}" if best else "")
            )
    files = "metrics: metrics.json  predictions: predictions.json" + ("  na_probs.json" if best else "") + "  adapter: adapter/"
    lines += [f"run dir: {out}", files, "=" * 64]
    print("\n".join(lines), flush=True)
