"""Stage-3 training throughput: non-pad tokens/s and peak memory of LoRA fine-tuning on the same LaFFi
feedback records, in the same batches and order, for this project's trainer, the code at an older
commit (b732bcc by default) and TRL's ``SFTTrainer`` (completion-only loss, the same LoRA), each in a
process of its own, interleaved, so that the machine's load falls on all of them alike.

    python benchmarks/train_throughput.py --model gemma3_270m --steps 12 --batch-size 4
    python benchmarks/train_throughput.py --model tinyllamas --steps 60 --batch-size 16

Prints a table and writes benchmarks/results/train_<model>.json. Needs the shared/ folder (SQuAD 2.0
dev, tinyllamas), the gemma extra for gemma3_270m, and the bench extra (TRL) for the TRL rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

IMPLS = ("ours", "baseline", "trl")
LORA = dict(
    task_type="CAUSAL_LM",
    r=16,
    lora_alpha=32,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


# -- the worker: one implementation, one process -----------------------------------------------------
def worker(args) -> dict:
    import torch

    records = [json.loads(line) for line in Path(args.records).read_text().splitlines()]
    torch.manual_seed(0)
    base = common.load_base(args.model)  # by this project's loader, for every implementation
    model, tokenizer = base.model, base.tokenizer
    if args.impl == "baseline":  # from here on, the package as it was at that commit
        for name in [m for m in sys.modules if m == "laffi_exp" or m.startswith("laffi_exp.")]:
            del sys.modules[name]
        sys.path.insert(0, args.baseline_dir)
    import laffi_exp

    torch.manual_seed(0)
    rss_loaded = common.peak_rss_gb()
    run = {"ours": train_lightning, "baseline": train_lightning, "trl": train_trl}[args.impl]
    times, tokens, targets, losses = run(model, tokenizer, records, args)
    timed = slice(args.warmup, None)  # the first steps pay for allocations and the one-time head check
    seconds = times[-1] - times[args.warmup - 1] if args.warmup else times[-1] - times[0]
    n_tokens = sum(tokens[timed])
    return {
        "impl": args.impl,
        "code": laffi_exp.__file__,
        "steps_timed": len(tokens[timed]),
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds,
        "tokens": n_tokens,
        "target_tokens": sum(targets[timed]),
        "peak_rss_gb": common.peak_rss_gb(),
        "rss_after_load_gb": rss_loaded,
        "losses": losses,
        "batch_tokens": tokens,
        "batch_targets": targets,
    }


def batches_in_order(records, batch_size):
    return [records[i : i + batch_size] for i in range(0, len(records), batch_size)]


def train_lightning(model, tokenizer, records, args):
    """This project's stage 3 (or the baseline commit's): its LoRAFineTuner and collate, under a
    Lightning Trainer with the pipeline's CPU trainer settings, on the records in the given order."""
    import pytorch_lightning as pl
    import torch
    from peft import LoraConfig
    from torch.utils.data import DataLoader

    from laffi_exp.stages.train_data import Pair, PairDataset, collate
    from laffi_exp.stages.train_module import LoRAFineTuner

    pairs = [Pair(r["id"], r["prompt"], r["target"]) for r in records]
    data = PairDataset(tokenizer, pairs, args.max_length, "train")
    loader = DataLoader(
        data, batch_size=args.batch_size, shuffle=False, collate_fn=lambda b: collate(b, tokenizer.pad_token_id)
    )
    module = LoRAFineTuner(model, LoraConfig(**LORA), lambda p: torch.optim.AdamW(p, lr=args.lr), warmup_ratio=0.1)
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=args.steps,
        max_epochs=-1,
        gradient_clip_val=1.0,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
        default_root_dir=tempfile.mkdtemp(),
    )
    module.train()
    trainer.fit(module, train_dataloaders=loader)
    return clock.times, clock.tokens, clock.targets, clock.losses


def _lightning_callback():
    import pytorch_lightning as pl

    class _StepClock(pl.Callback):
        def __init__(self):
            self.times, self.tokens, self.targets, self.losses = [], [], [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter())
            self.tokens.append(int(batch["attention_mask"].sum()))
            self.targets.append(int((batch["labels"] != -100).sum()))
            self.losses.append(float(outputs["loss"]))

    return _StepClock


def StepClock():  # noqa: N802 - a class made on first use, so that the parent process imports no Lightning
    return _lightning_callback()()


def train_trl(model, tokenizer, records, args):
    """TRL's SFTTrainer on the same records and order: prompt-completion data, completion-only loss,
    peft LoRA of the same rank and targets, fp32, no activation checkpointing, sequential sampling."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock = {"times": [], "losses": []}
    counted = {"tokens": [], "targets": []}

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            clock["times"].append(time.perf_counter())

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock["losses"].append(float(logs["loss"]))

    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["target"]} for r in records])
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        max_length=args.max_length,
        completion_only_loss=True,
        loss_type=args.trl_loss,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        seed=0,
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        callbacks=[Clock()],
    )
    collator = trainer.data_collator

    def counting(features):
        batch = collator(features)
        counted["tokens"].append(int(batch["attention_mask"].sum()))
        counted["targets"].append(int((batch["labels"] != -100).sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    n = len(clock["times"])
    return clock["times"], counted["tokens"][:n], counted["targets"][:n], clock["losses"]


# -- the harness ----------------------------------------------------------------------------------------
def flops_per_step(model_config, lora_r: int, tokens: int, targets: int, seq_len: float) -> float:
    """FLOPs a LoRA step needs on ``tokens`` non-pad tokens with the output head at ``targets`` positions
    only: frozen linear layers forward (2 per weight) and back to their inputs (2 more, no weight
    gradient), LoRA layers forward and backward with weight gradients (6 per weight), causal attention
    scores and mixing over half the sequence on average (forward 4·heads·head_dim·context per layer,
    backward twice that), and the output head forward and back to the hidden state (4·vocab·hidden)."""
    c = model_config
    hidden, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    shapes = [
        (hidden, heads * head_dim),
        (hidden, kv_heads * head_dim),
        (hidden, kv_heads * head_dim),
        (heads * head_dim, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    linear = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(lora_r * (i + o) for i, o in shapes)
    attention = layers * 12 * heads * head_dim * (seq_len + 1) / 2
    return tokens * (4 * linear + 6 * lora + attention) + targets * 4 * c.vocab_size * hidden


def gemm_shapes(model_config, tokens: int, targets: int) -> list[tuple[int, int, int]]:
    """The matrix multiplies of one step, forward and backward (to the inputs), by shape."""
    c = model_config
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    shapes = [
        (c.hidden_size, heads * head_dim),
        (c.hidden_size, kv_heads * head_dim),
        (heads * head_dim, c.hidden_size),
        (c.hidden_size, c.intermediate_size),
        (c.intermediate_size, c.hidden_size),
    ]
    out = []
    for i, o in shapes:
        out += [(tokens, i, o), (tokens, o, i)]
    out += [(targets, c.hidden_size, c.vocab_size), (targets, c.vocab_size, c.hidden_size)]
    return out


def run_worker(impl: str, args, records: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--impl",
        impl,
        "--records",
        str(records),
        "--out",
        str(out),
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--trl-loss",
        args.trl_loss,
        "--baseline-dir",
        args.baseline_dir,
    ]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"error: the {impl} worker failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["wall_s"] = round(time.time() - started, 1)
    out.unlink()
    return result


def baseline_checkout(ref: str) -> str:
    """The laffi_exp package as it was at ``ref`` (git archive into benchmarks/.baseline/<ref>)."""
    target = common.ROOT / "benchmarks" / ".baseline" / ref
    if not (target / "laffi_exp").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(common.ROOT), "archive", "--format=tar", ref, "laffi_exp", "conf"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return str(target)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3_270m", choices=common.MODELS)
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: ours, baseline, trl")
    p.add_argument("--records", default="400", help="feedback records (only steps x batch size are trained on)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--order",
        default="grouped",
        choices=("grouped", "random"),
        help=(
            "grouped: this project's length-grouped order; random: a plain shuffle (every implementation gets the same)"
        ),
    )
    p.add_argument("--repeats", type=int, default=2, help="rounds of every implementation, interleaved")
    p.add_argument("--baseline", default="b732bcc", help="the commit whose code is the baseline")
    p.add_argument("--trl-loss", default="nll")
    p.add_argument("--out", default=None)
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--baseline-dir", default="", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        common.write_result(Path(args.out), worker(args))
        return

    import torch

    from laffi_exp.core.prompts import Prompter
    from laffi_exp.stages.train_data import LengthGroupedSampler, encode_pair

    impls = [i for i in args.impls.split(",") if i]
    if unknown := set(impls) - set(IMPLS):
        raise SystemExit(f"error: --impls: unknown {sorted(unknown)}; expected some of {', '.join(IMPLS)}")
    args.baseline_dir = baseline_checkout(args.baseline) if "baseline" in impls else ""
    base = common.load_base(args.model)  # also converts the GGUF once, before any timing
    tokenizer, config = base.tokenizer, base.model.config
    prompter = Prompter()
    examples = common.squad_examples(int(args.records), tokenizer, prompter, args.max_length - 64)
    pairs = common.feedback_pairs(examples, prompter)
    lengths = [len(encode_pair(tokenizer, pair)[0]) for pair in pairs]
    if args.order == "grouped":
        order = list(LengthGroupedSampler(lengths, args.batch_size, seed=0))
    else:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    used = order[: args.steps * args.batch_size]
    records = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    records.write_text(
        "".join(
            json.dumps({"id": pairs[i].id, "prompt": pairs[i].prompt, "target": pairs[i].target}) + "\n" for i in used
        )
    )
    del base

    rate_before = common.matmul_rate(
        gemm_shapes(config, statistics.mean(lengths) * args.batch_size, 40 * args.batch_size)
    )
    runs = []
    for round_ in range(args.repeats):
        for impl in impls:
            result = run_worker(impl, args, records)
            result["round"] = round_
            runs.append(result)
            print(
                f"round {round_} {impl:>8}: {result['tokens_per_s']:8.1f} tokens/s, "
                f"peak RSS {result['peak_rss_gb']:.2f} GB",
                flush=True,
            )
    rate_after = common.matmul_rate(
        gemm_shapes(config, statistics.mean(lengths) * args.batch_size, 40 * args.batch_size)
    )
    rate = (rate_before + rate_after) / 2

    summary = {}
    for impl in impls:
        mine = [r for r in runs if r["impl"] == impl]
        tps = [r["tokens_per_s"] for r in mine]
        steps = mine[0]["steps_timed"]
        tokens, targets = mine[0]["tokens"], mine[0]["target_tokens"]
        mean_len = tokens / (steps * args.batch_size)
        need = flops_per_step(config, LORA["r"], tokens, targets, mean_len)  # over all timed steps
        limit_s = need / rate
        summary[impl] = {
            "tokens_per_s": tps,
            "median_tokens_per_s": statistics.median(tps),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in mine),
            "rss_after_load_gb": max(r["rss_after_load_gb"] for r in mine),
            "timed_tokens": tokens,
            "timed_target_tokens": targets,
            "compute_limit_tokens_per_s": tokens / limit_s,
            "share_of_compute_limit": [t / (tokens / limit_s) for t in tps],
        }
    result = {
        "benchmark": "train_throughput",
        "model": args.model,
        "order": args.order,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "max_length": args.max_length,
        "lora": LORA,
        "baseline": args.baseline,
        "trl_loss": args.trl_loss,
        "matmul_flops_per_s": {"before": rate_before, "after": rate_after},
        "machine": common.machine(),
        "summary": summary,
        "runs": runs,
    }
    out = (
        Path(args.out) if args.out else common.ROOT / "benchmarks" / "results" / f"train_{args.model}_{args.order}.json"
    )
    common.write_result(out, result)
    print(
        f"\nmatmul rate (the model's GEMM shapes, fp32): "
        f"{rate_before / 1e9:.1f} / {rate_after / 1e9:.1f} GFLOP/s (before / after)"
    )
    print(
        f"{'impl':>10} {'tokens/s (median)':>18} {'vs baseline':>12} {'vs trl':>8} "
        f"{'of compute limit':>17} {'peak RSS GB':>12}"
    )
    for impl, s in summary.items():
        vs = {
            other: s["median_tokens_per_s"] / summary[other]["median_tokens_per_s"]
            for other in ("baseline", "trl")
            if other in summary
        }
        print(
            f"{impl:>10} {s['median_tokens_per_s']:>18.1f} "
            f"{vs.get('baseline', float('nan')):>11.2f}x {vs.get('trl', float('nan')):>7.2f}x "
            f"{statistics.median(s['share_of_compute_limit']):>16.0%} {s['peak_rss_gb']:>12.2f}"
        )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
