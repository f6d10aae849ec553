"""The model-source interface: what set-up asks of the ``model`` config's ``_target_``, and the
loaded model it gets back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BaseModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    name: str
    path: str
    chat_template: bool = False  # prompts must go through format_prompt (an instruct model's chat format)
    fingerprint: dict | None = None  # what identifies the weights, where the folder's files do not (a GGUF's sha256)

    def format_prompt(self, prompt: str) -> str:
        """The text to tokenize for ``prompt``: one user turn of the chat template when ``chat_template``."""
        return wrap_chat(self.tokenizer, prompt) if self.chat_template else prompt


def wrap_chat(tokenizer, prompt: str) -> str:
    """``prompt`` as a single user message with the generation prompt of ``tokenizer``'s chat template,
    ready to be tokenized with ``add_special_tokens=True``; unchanged if the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    # Templates that write BOS themselves would get a second one from the tokenizer.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


class ModelSource:
    """Where a base model comes from (the embedded default, a transformers folder or hub id, a GGUF)."""

    def check(self) -> None:
        """Cheap checks before any heavy work (files present, settings); a ConfigError names the key."""

    def load(self) -> BaseModel:
        """The model and its tokenizer, ready for generation (eval mode)."""
        raise NotImplementedError
