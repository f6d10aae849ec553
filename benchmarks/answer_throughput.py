"""Answer-stage throughput: questions/s of the pipeline's batched generation (``laffi_exp.stages.answer.generate``:
length-sorted batches, left padding, KV cache, the head at the last position only) against a
per-example ``generate`` loop on the same prompts, with the same greedy decoding and stop rule, and as
a share of the compute limit of the prompt pass (this machine's measured fp32 matrix-multiply rate ÷
the FLOPs of reading every prompt token once).

    python benchmarks/answer_throughput.py --model gemma3_270m --questions 64

Prints a table and writes benchmarks/results/answer_<model>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def per_example(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """The loop a first script writes: one prompt at a time, greedy, stopping at EOS or a newline."""
    import torch

    from laffi_exp.models.generation import _newline_ids

    stop = [tokenizer.eos_token_id, *_newline_ids(tokenizer)]
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt")
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
            out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def prompt_flops(config, n_tokens: int, seq_len: float, n_prompts: int) -> float:
    """FLOPs of one forward pass over every prompt token (linear layers 2 per weight, causal attention),
    plus the output head at each prompt's last position."""
    c = config
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_layer = (
        c.hidden_size * heads * head_dim * 2
        + c.hidden_size * kv_heads * head_dim * 2
        + 3 * c.hidden_size * c.intermediate_size
    )
    linear = 2 * c.num_hidden_layers * per_layer
    attention = c.num_hidden_layers * 4 * heads * head_dim * (seq_len + 1) / 2
    return n_tokens * (linear + attention) + n_prompts * 2 * c.vocab_size * c.hidden_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3_270m", choices=common.MODELS)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="rounds of both, interleaved")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from laffi_exp.core.prompts import Prompter
    from laffi_exp.models.generation import generate

    base = common.load_base(args.model)
    model, tokenizer = base.model, base.tokenizer
    prompter = Prompter()
    examples = common.squad_examples(args.questions, tokenizer, prompter, args.max_length - 64, seed=1)
    prompts = [prompter.answer_prompt(ex) for ex in examples]
    lengths = [len(tokenizer(pr)["input_ids"]) for pr in prompts]
    gemm = (
        [(sum(lengths) / len(lengths) * 8, i, o) for i, o in ((640, 2048), (2048, 640), (640, 1024), (1024, 640))]
        if args.model == "gemma3_270m"
        else [(sum(lengths) / len(lengths) * 8, model.config.hidden_size, model.config.intermediate_size)]
    )
    rate_before = common.matmul_rate(gemm)
    timings = {"batched": [], "per_example": []}
    outputs = {}
    for _ in range(args.repeats):
        for name in timings:
            start = time.perf_counter()
            if name == "batched":
                texts = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, desc="batched")
            else:
                texts = per_example(model, tokenizer, prompts, args.max_new_tokens)
            timings[name].append(time.perf_counter() - start)
            outputs[name] = texts
            print(f"{name:>12}: {len(prompts) / timings[name][-1]:.2f} questions/s", flush=True)
    rate_after = common.matmul_rate(gemm)
    rate = (rate_before + rate_after) / 2
    same = sum(
        a.split("\n")[0].strip() == b.split("\n")[0].strip() for a, b in zip(outputs["batched"], outputs["per_example"])
    )
    need = prompt_flops(model.config, sum(lengths), statistics.mean(lengths), len(prompts))
    qps = {k: len(prompts) / statistics.median(v) for k, v in timings.items()}
    result = {
        "benchmark": "answer_throughput",
        "model": args.model,
        "questions": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": sum(lengths),
        "mean_prompt_tokens": statistics.mean(lengths),
        "seconds": timings,
        "questions_per_s": qps,
        "speedup": qps["batched"] / qps["per_example"],
        "same_answers": same,
        "matmul_flops_per_s": {"before": rate_before, "after": rate_after},
        "prompt_pass_limit_questions_per_s": rate / (need / len(prompts)),
        "share_of_prompt_pass_limit": qps["batched"] / (rate / (need / len(prompts))),
        "machine": common.machine(),
    }
    out = Path(args.out) if args.out else common.ROOT / "benchmarks" / "results" / f"answer_{args.model}.json"
    common.write_result(out, result)
    print(
        f"\nmatmul rate {rate_before / 1e9:.1f} / {rate_after / 1e9:.1f} GFLOP/s; prompt pass limit "
        f"{result['prompt_pass_limit_questions_per_s']:.2f} questions/s"
    )
    print(
        f"batched {qps['batched']:.2f} q/s, per-example {qps['per_example']:.2f} q/s: {result['speedup']:.2f}x; "
        f"{result['share_of_prompt_pass_limit']:.0%} of the prompt-pass limit; same first lines {same}/{len(prompts)}"
    )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
