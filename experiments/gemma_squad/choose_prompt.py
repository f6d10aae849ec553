"""How the gemma3_270m preset's answer prompt was chosen: the untrained base answers the *validation*
questions (never the test split) with each candidate prompt, scored with SQuAD 2.0 EM/F1.

    python experiments/gemma_squad/choose_prompt.py [overrides...]

Every candidate is a set of overrides of the composed config (``prompt.shots`` and templates); the
answers go through the stage cache, so a re-run costs nothing. Writes prompt_choice.json beside this
file and prints a table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from laffi_exp.core.config import CONF_DIR
from laffi_exp.stages import evaluate
from laffi_exp.stages.answer import as_predictions, predict_split
from laffi_exp.stages.setup import setup

HERE = Path(__file__).resolve().parent
BASE = [
    "model=gemma3_270m",
    "dataset=squad_v2",
    f"dataset.path={HERE.parents[2] / 'shared' / 'data' / 'squad_v2'}",
    "dataset.split_by=article",
    "model.weights_from=package",
    "dataset.num_train=128",
    "dataset.num_val=64",
    "dataset.num_eval=8",
    "logger=csv",
]
INSTRUCTION = (
    "Answer the question with a short span copied from the context. "
    "If the context does not answer it, write unanswerable.\n\n"
)
CANDIDATES = {
    "zero-shot": ["prompt.shots=0"],
    "zero-shot + instruction": ["prompt.shots=0", f"prompt.instruction='{INSTRUCTION}'"],
    "2-shot": ["prompt.shots=2"],
}


def main() -> None:
    rows = {}
    for name, overrides in CANDIDATES.items():
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "config", overrides=[*BASE, *overrides, *sys.argv[1:], "paths.output_dir=outputs/choose_prompt"]
            )
        started = time.time()
        s = setup(cfg)
        answers = predict_split(s, "validation")
        scores = evaluate.score(s.splits["validation"], as_predictions(answers), "val")
        rows[name] = {
            "overrides": overrides,
            "questions": len(answers),
            "seconds": round(time.time() - started, 1),
            "prompt_tokens_mean": sum(
                len(s.tokenizer(s.prompter.answer_prompt(ex))["input_ids"]) for ex in s.splits["validation"]
            )
            / len(answers),
            **{k.removeprefix("val/"): v for k, v in scores.items()},
            "no_answer_predictions": sum(a.prediction == "" for a in answers),
        }
        print(
            f"{name:<26} EM {rows[name]['exact']:5.1f}  F1 {rows[name]['f1']:5.1f}  "
            f"HasAns EM {rows[name].get('HasAns_exact', float('nan')):5.1f}  "
            f"NoAns EM {rows[name].get('NoAns_exact', float('nan')):5.1f}  "
            f"prompt {rows[name]['prompt_tokens_mean']:.0f} tokens  "
            f"{rows[name]['seconds']:.0f} s",
            flush=True,
        )
    (HERE / "prompt_choice.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
