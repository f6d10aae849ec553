"""The synthetic pool from a local transformers causal LM prompted few-shot, greedy (the paper's set-up)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.hashing import fingerprint, weights_fingerprint
from laffi_exp.core.prompts import Prompter
from laffi_exp.feedback.llm import FewShotAnnotator, Request

log = logging.getLogger(__name__)


class HFFewShotAnnotator(FewShotAnnotator):
    """A local transformers causal LM, prompted few-shot and decoded greedily in left-padded batches
    (``laffi_exp.stages.answer.generate``); the feedback is the first line of the completion.

    The model is loaded like a base model (``laffi_exp.models.pretrained.PretrainedBase``: a local
    folder, or a hub id from the hub or the local Hugging Face cache, a pad token added when missing),
    and only when some response is not cached. A prompt longer than the model's window (less
    ``max_new_tokens``) first loses shots, last ones first, down to zero-shot; if still too long, its
    passage is cut around the reference answer (``laffi_exp.data.window.fit_contexts``). The cache key
    holds the model (path and a fingerprint of its files, ``laffi_exp.core.hashing.weights_fingerprint``), the full
    prompt, ``max_new_tokens``, ``dtype`` and ``chat_template``; responses are committed batch by batch."""

    def __init__(
        self,
        name_or_path: str,
        k: int = 4,
        shot_seed: int = 0,
        shots_path: str | None = None,
        template: str | None = None,
        shot_template: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        dtype: str = "float32",
        device: str = "auto",
        chat_template: bool = False,
        cache_dir: str | Path | None = None,
        show_gold: bool = True,
    ):
        from laffi_exp.models.pretrained import PretrainedBase

        path = Path(str(name_or_path)).expanduser()
        self.name = f"hf_fewshot:{path.name if path.is_dir() else name_or_path}"
        super().__init__(k, shot_seed, shots_path, template, shot_template, show_gold, cache_dir)
        for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"feedback.synthetic.{key}: expected an integer >= 1, got {value!r}")
        self.name_or_path = str(name_or_path)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.chat_template = chat_template
        self.source_model = PretrainedBase(self.name_or_path, dtype=dtype, chat_template=chat_template)
        self._base = None  # the loaded BaseModel
        self._fingerprint: str | None = None

    def check(self) -> None:
        """The model folder or hub id is usable (reads its config only, no weights)."""
        with _annotator_keys():
            self.source_model.check()

    def _key_parts(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(weights_fingerprint(str(Path(self.name_or_path).expanduser())))
        return dict(
            kind="hf_fewshot",
            model=self.name_or_path,
            fingerprint=self._fingerprint,
            max_new_tokens=self.max_new_tokens,
            dtype=self.dtype,
            chat_template=self.chat_template,
        )

    def _load(self):
        if self._base is None:
            import torch

            with _annotator_keys():
                self._base = self.source_model.load()
            device = self.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self._base.model.to(device)
        return self._base

    def _complete(self, requests: Sequence[Request], progress: bool) -> Iterator[tuple[str, str]]:
        from laffi_exp.models.generation import generate

        base = self._load()
        prompts = [self._fit(r, base) for r in requests]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
        # One generate() call per batch, so that each batch is cached as soon as it is done.
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=f"annotate ({self.name})", disable=not progress, mininterval=2):
            idx = order[start : start + self.batch_size]
            batch = [prompts[i] for i in idx]
            texts = generate(base.model, base.tokenizer, batch, self.max_new_tokens, len(idx), desc="batch")
            for i, text in zip(idx, texts):
                yield requests[i].key, text

    def _fit(self, request: Request, base) -> str:
        """The prompt to generate from: ``request.prompt`` if it fits the window, else with fewer shots,
        else zero-shot with the passage cut."""
        from laffi_exp.data.window import fit_contexts

        tokenizer = base.tokenizer
        budget = _window(base.model, tokenizer) - self.max_new_tokens
        shots = self.shots or []
        for n in range(len(shots), -1, -1):
            prompt = (
                request.prompt if n == len(shots) else self.prompt.render(request.ex, request.prediction, shots[:n])
            )
            text = base.format_prompt(prompt)
            if len(tokenizer(text, verbose=False)["input_ids"]) <= budget:
                if n < len(shots):
                    log.debug("%s: prompt for %s fits with %d of %d shots", self.name, request.ex.id, n, len(shots))
                return text
        # fit_contexts cuts a passage until a Prompter's feedback prompt fits: give it this zero-shot
        # prompt with every field filled in but the passage.
        filled = {f: _escape(v) for f, v in self.prompt.fields(request.ex, request.prediction).items()}
        zero_shot = Prompter(
            feedback_template=self.prompt.template.format(**{**filled, "shots": "", "context": "{context}"}),
            wrap=base.format_prompt,
        )
        (ex,), _ = fit_contexts([request.ex], tokenizer, zero_shot, budget, around_answer=True)
        log.debug("%s: passage of %s cut to fit the window", self.name, request.ex.id)
        return base.format_prompt(self.prompt.render(ex, request.prediction, []))


@contextmanager
def _annotator_keys():
    """PretrainedBase names its keys as the base model's (``model.name_or_path``); here they are ours."""
    try:
        yield
    except ConfigError as err:
        text = str(err)
        raise ConfigError(
            "feedback.synthetic." + text[len("model.") :] if text.startswith("model.") else text
        ) from None


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _window(model, tokenizer) -> int:
    """Tokens the model can attend to: its position limit, or the tokenizer's when smaller."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**7]  # tokenizers say 1e30 for "unknown"
    return min(limits) if limits else 2048
