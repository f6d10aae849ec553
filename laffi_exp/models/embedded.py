"""The embedded default base LLM: a small LLaMA built from config and warmed up once on the synthetic
pool. The package ships the build of the default config (``embedded_base/``, ~4 MB, every file checked
against its sha256 on load), so a first run starts at once; any other config is built once and cached.
``python -m laffi_exp.models.embedded`` finds it (``--build``: builds it into the cache even where the
package ships it) and prints where it is.

Building needs ``feedback_writer`` (``model.feedback_writer``), the annotator that writes the feedback
texts of the warm-up corpus: a layer above this one (``laffi_exp.feedback``), so it comes from the config;
loading a build needs none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.hashing import unit_hash
from laffi_exp.core.io import atomic_write_text
from laffi_exp.core.prompts import Prompter
from laffi_exp.data.squad_format import examples_from_squad
from laffi_exp.data.synthetic import GENERATOR_VERSION, generate
from laffi_exp.models.base import BaseModel
from laffi_exp.models.padding import pad

log = logging.getLogger(__name__)

BUILD_VERSION = 3  # bump when the build procedure changes, so old cache entries are not reused
SHIPPED_DIR = Path(__file__).resolve().parent / "embedded_base"  # the default config's build, package data


class EmbeddedBase:
    """The offline default base model: a LLaMA-architecture decoder built from ``architecture``, with a
    byte-level BPE tokenizer trained on generated text, warmed up on the synthetic ``pool`` split so it
    follows the QA format. Built once, then loaded from ``cache_dir/base_models/<content key>``."""

    def __init__(
        self,
        cache_dir: str,
        architecture: dict,
        vocab_size: int = 1024,
        seed: int = 0,
        warmup_questions: int = 6000,
        warmup_steps: int = 3000,
        batch_size: int = 32,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        feedback_share: float = 0.75,
        feedback_writer: Callable[[int], Any] | None = None,
    ):
        self.cache_dir = Path(cache_dir).expanduser()
        self.architecture = dict(architecture)
        self.vocab_size = vocab_size
        self.seed = seed
        self.warmup_questions = warmup_questions
        self.warmup_steps = warmup_steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.feedback_share = feedback_share
        # seed -> annotator (``.annotate(example, candidate) -> str``), e.g. a partial SimulatedHuman. Used only
        # to build the weights and not part of their spec: a change to the texts it writes must bump BUILD_VERSION.
        self.feedback_writer = feedback_writer

    def spec(self) -> dict:
        """Exactly the inputs that determine the built weights."""
        return {
            "build_version": BUILD_VERSION,
            "generator_version": GENERATOR_VERSION,
            "architecture": self.architecture,
            "vocab_size": self.vocab_size,
            "seed": self.seed,
            "warmup_questions": self.warmup_questions,
            "warmup_steps": self.warmup_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "prompt": [Prompter().answer_template, Prompter().no_answer_text],
            "feedback_share": self.feedback_share,
        }

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        return self.cache_dir / "base_models" / f"embedded-{self.key()}"

    def check(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(self.architecture.get(name), int) or self.architecture[name] <= 0:
                raise ConfigError(f"model.architecture.{name}: expected a positive integer")

    def shipped(self, folder: Path = SHIPPED_DIR) -> Path | None:
        """The package's build of this spec, if it ships one and every file matches its sha256."""
        listing = folder / "SHIPPED.json"
        if not listing.is_file():
            return None
        info = json.loads(listing.read_text())
        if info.get("key") != self.key():
            return None  # another config: built and cached as usual
        for name, digest in info["files"].items():
            path = folder / name
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                log.warning("The shipped embedded base model fails its checksum (%s): building it instead", path)
                return None
        return folder

    def load(self, build: bool = False) -> BaseModel:
        """The base model: the package's build of this spec, else the cached one, else built now (once,
        under a file lock). ``build``: never the package's, so the build itself can be checked."""
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        self.check()
        folder = None if build else self.shipped()
        if folder is None:
            folder = self.path
            if not (self.path / "build_info.json").is_file():
                self._check_writer()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(str(self.path) + ".lock"):  # parallel sweep jobs: one builds, the others wait
                    if not (self.path / "build_info.json").is_file():
                        self.build()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        # By content, not by folder: the shipped and a cached copy of one build share their stage cache.
        weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        return BaseModel(model=model, tokenizer=tokenizer, name=f"embedded-{self.key()}", path=str(folder),
                         fingerprint={"embedded": self.key(), "weights_sha256": weights})  # fmt: skip

    # -- the one-time build -------------------------------------------------------------------
    def _check_writer(self) -> None:
        if not callable(self.feedback_writer):
            raise ConfigError(
                "model.feedback_writer: building the embedded base model needs a feedback writer (seed -> "
                "annotator), e.g. {_target_: laffi_exp.feedback.simulated.SimulatedHuman, _partial_: true}"
            )

    def _texts(self) -> list[str]:
        """Warm-up texts: pool questions with their gold answers. A share (``feedback_share``) instead
        carry feedback on a candidate answer, half the gold one and half a wrong one (another span of
        the passage, or "unanswerable"), so that the base knows the words and the form of feedback, as
        an instruction-tuned LLM does, though never on the main splits' questions nor on its own answers."""
        self._check_writer()
        prompter, human = Prompter(), self.feedback_writer(self.seed)
        pool = examples_from_squad(generate(self.seed, "pool", self.warmup_questions), source="pool")
        spans: dict[str, list[str]] = {}
        for ex in pool:
            spans.setdefault(ex.context, []).extend(ex.answers)
        texts = []
        for ex in pool:
            u = unit_hash(self.seed, "feedback", ex.id)
            if u >= self.feedback_share:
                texts.append(prompter.answer_prompt(ex) + prompter.answer_target(ex.gold))
                continue
            candidate = ex.gold
            if u < self.feedback_share / 2:  # a wrong candidate
                others = [a for a in spans[ex.context] if a not in ex.answers]
                candidate = (
                    others[0] if others else ("" if ex.answers else spans[ex.context][0] if spans[ex.context] else "")
                )
            texts.append(
                prompter.feedback_prompt(ex, candidate) + prompter.feedback_target(human.annotate(ex, candidate))
            )
        return texts

    def _tokenizer(self, texts: list[str]):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from tokenizers.processors import TemplateProcessing
        from transformers import PreTrainedTokenizerFast

        # The warm-up texts, and contexts and questions from the main splits' generator (with another
        # seed, so no evaluation text is seen), as a pretrained LLM's tokenizer knows their words.
        corpus = list(texts)
        for split in ("train", "validation", "test"):
            corpus += [
                f"{ex.context}\n{ex.question}"
                for ex in examples_from_squad(generate(self.seed + 1, split, 1000), source=split)
            ]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
        )

    def build(self) -> Path:
        from transformers import LlamaConfig, LlamaForCausalLM

        self._check_writer()
        start = time.time()
        log.info("Building the embedded base model once (cached at %s)", self.path)
        texts = self._texts()
        tokenizer = self._tokenizer(texts)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            **self.architecture,
        )
        # A private RNG: a run that builds the base must go on exactly like one that loads it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(config)
            losses = _warm_up(
                model, tokenizer, texts, self.warmup_steps, self.batch_size, self.lr, self.weight_decay, self.seed
            )
        tmp = self.path.with_name(self.path.name + f".tmp{int(start)}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "spec": self.spec(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": losses[-1] if losses else None,
            "seconds": round(time.time() - start, 1),
            "torch": torch.__version__,
        }
        atomic_write_text(tmp / "build_info.json", json.dumps(info, indent=2) + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(self.path)
        except OSError:  # another process finished the same build first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("Built the embedded base model in %.0f s: %s", time.time() - start, self.path)
        return self.path


def _warm_up(model, tokenizer, texts, steps, batch_size, lr, weight_decay, seed) -> list[float]:
    """Causal-LM training on whole QA texts, with a linear warm-up and cosine decay."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token
    enc = [tokenizer(t + eos, add_special_tokens=True)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    # The loop that built the shipped weights, kept by hand so that a rebuild reproduces them bit for bit: no
    # transformers schedule is this ramp times a cosine over every step (each gives other weights from step 0).
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="warm-up (one-time build)", mininterval=5)
    for step in bar:
        idx = torch.randint(len(enc), (batch_size,), generator=gen).tolist()
        batch = [enc[i] for i in idx]
        ids, mask = pad(batch, tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses


def main() -> None:
    """Build (or find) the embedded default base model with the default config and print its folder."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from laffi_exp.core.config import CONF_DIR, model_source

    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(
            "usage: python -m laffi_exp.models.embedded [--build] [KEY=VALUE ...]\n\n"
            "Find (or build once) the embedded base model of the config (conf/config.yaml with the Hydra\n"
            "overrides given, e.g. model.warmup_steps=100) and print its folder.\n\n"
            "  --build  build it into paths.cache_dir even where the package ships this build"
        )
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build = "--build" in args  # into the cache, even where the package ships this build
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[a for a in args if a != "--build"])
    base = instantiate(model_source(cfg))
    try:
        print(base.load(build=build).path)
    except ConfigError as err:  # as the main CLI: one line, exit code 2
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
