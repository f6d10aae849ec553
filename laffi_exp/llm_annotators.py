"""The synthetic feedback pool from real LLMs: an annotator prompted few-shot with k human-annotated
examples, either any OpenAI-compatible chat-completions endpoint (``annotator=openai``) or a local
transformers causal LM (``annotator=hf_fewshot``). Every call goes through a ``ResponseCache``.

The prompt (``TEMPLATE``, one ``SHOT_TEMPLATE`` per worked example) shows the passage, the question,
the reference answer (``show_gold``: the annotator knows the key, as a human annotator does) and the
predicted answer, and asks for one line of feedback in the style of the shots: a verdict first
("Correct." / "Incorrect."), and when incorrect the right answer as ``The answer is "X"`` or that the
question cannot be answered. Placeholders: ``{shots} {context} {question} {gold} {prediction}`` in
``template``; ``{context} {question} {gold} {prediction} {feedback}`` in ``shot_template``; ``{gold}``
becomes a ``GOLD_LINE`` (or nothing when ``show_gold`` is false).

The raw response is what is cached; the feedback is its first non-empty line, without a leading
"Feedback:".
"""

from __future__ import annotations

import logging
import os
import random
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlparse

from tqdm.auto import tqdm

from laffi_exp.hashing import unit_hash
from laffi_exp.cache import fingerprint, weights_fingerprint
from laffi_exp.errors import AnnotationError, ConfigError
from laffi_exp.io import read_jsonl
from laffi_exp.prompts import NO_ANSWER_TEXT, Prompter
from laffi_exp.records import QAExample
from laffi_exp.response_cache import ResponseCache

log = logging.getLogger(__name__)

TEMPLATE = (
    "Give feedback on the answer to a question about a passage. Begin with a verdict, \"Correct.\" or "
    "\"Incorrect.\". When the answer is incorrect, give the right answer as: The answer is \"...\"; or, "
    "when the passage does not answer the question, say that the question cannot be answered. "
    "Write one line, in the style of the examples.\n\n"
    "{shots}"
    "Context: {context}\nQuestion: {question}\n{gold}Answer: {prediction}\nFeedback:"
)
SHOT_TEMPLATE = "Context: {context}\nQuestion: {question}\n{gold}Answer: {prediction}\nFeedback: {feedback}\n\n"
GOLD_LINE = "Reference answer: {answer}\n"
NO_GOLD = "none (the passage does not answer the question)"
CACHE_FILE = Path("annotations") / "responses.sqlite"  # under paths.cache_dir, shared by a sweep

TEMPLATE_FIELDS = ("shots", "context", "question", "gold", "prediction")
SHOT_FIELDS = ("context", "question", "gold", "prediction", "feedback")
SHOT_FILE_FIELDS = ("context", "question", "prediction", "feedback")


@dataclass(frozen=True)
class Shot:
    """One worked example of the few-shot prompt: a predicted answer and a human's feedback on it.
    ``answers`` None: the reference answer is unknown (a shots file without ``answers``)."""

    context: str
    question: str
    prediction: str
    feedback: str
    answers: tuple[str, ...] | None = None


def load_shots(path: str | Path) -> list[Shot]:
    """Shots from a JSONL file with ``context``, ``question``, ``prediction``, ``feedback`` fields
    (and optionally ``answers``, a list of reference answers, empty for an unanswerable question)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"feedback.synthetic.shots_path: {path}: no such file")
    shots = []
    for number, row in enumerate(read_jsonl(path), 1):
        missing = [f for f in SHOT_FILE_FIELDS if not isinstance(row.get(f), str)]
        if missing:
            raise ConfigError(
                f"feedback.synthetic.shots_path: {path} line {number}: expected string fields "
                f"{', '.join(SHOT_FILE_FIELDS)}; missing or not a string: {', '.join(missing)}"
            )
        answers = row.get("answers")
        shots.append(Shot(**{f: row[f] for f in SHOT_FILE_FIELDS}, answers=None if answers is None else tuple(answers)))
    return shots


def select_shots(pool: Sequence[Shot], k: int, seed: int) -> list[Shot]:
    """``k`` shots by a hash of (seed, shot): the same set whatever the pool's order, and the set for a
    smaller k is part of the set for a larger one."""
    ranked = sorted(pool, key=lambda s: unit_hash(seed, "shot", s.context, s.question, s.prediction))
    return ranked[:k]


def extract_feedback(response: str) -> str:
    """The feedback in a raw response: its first non-empty line, without a leading "Feedback:"."""
    for line in response.strip().splitlines():
        line = line.strip()
        if line.lower().startswith("feedback:"):
            line = line[len("feedback:") :].strip()
        if line:
            return line
    return ""


class FewShotPrompt:
    """Renders the few-shot annotation prompt for one (example, prediction)."""

    def __init__(self, template: str | None = None, shot_template: str | None = None, show_gold: bool = True):
        self.template = TEMPLATE if template is None else template
        self.shot_template = SHOT_TEMPLATE if shot_template is None else shot_template
        self.show_gold = show_gold
        _check_fields("template", self.template, TEMPLATE_FIELDS)
        _check_fields("shot_template", self.shot_template, SHOT_FIELDS)

    def gold(self, answers: tuple[str, ...] | None) -> str:
        if not self.show_gold or answers is None:
            return ""
        distinct = list(dict.fromkeys(answers))
        return GOLD_LINE.format(answer=" or ".join(f'"{a}"' for a in distinct) if distinct else NO_GOLD)

    def fields(self, ex: QAExample, prediction: str) -> dict[str, str]:
        return dict(
            context=ex.context,
            question=ex.question,
            gold=self.gold(ex.answers),
            prediction=prediction if prediction else NO_ANSWER_TEXT,
        )

    def render_shots(self, shots: Sequence[Shot]) -> str:
        return "".join(
            self.shot_template.format(
                context=s.context,
                question=s.question,
                gold=self.gold(s.answers),
                prediction=s.prediction if s.prediction else NO_ANSWER_TEXT,
                feedback=s.feedback,
            )
            for s in shots
        )

    def render(self, ex: QAExample, prediction: str, shots: Sequence[Shot]) -> str:
        return self.template.format(shots=self.render_shots(shots), **self.fields(ex, prediction))


def _check_fields(key: str, template: str, allowed: Sequence[str]) -> None:
    try:
        template.format(**{f: "" for f in allowed})
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"feedback.synthetic.{key}: bad placeholder ({type(err).__name__}: {err}); allowed: "
            + " ".join("{" + f + "}" for f in allowed)
        ) from None


@dataclass(frozen=True)
class _Request:
    key: str
    prompt: str
    ex: QAExample
    prediction: str


class _FewShotAnnotator:
    """What both LLM annotators share: shot selection, prompts, and the cache around every call.
    Subclasses set ``name`` and implement ``_key_parts`` and ``_complete``."""

    source = "synthetic"
    name: str

    def __init__(
        self,
        k: int,
        shot_seed: int,
        shots_path: str | None,
        template: str | None,
        shot_template: str | None,
        show_gold: bool,
        cache_dir: str | Path | None,
    ):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"feedback.synthetic.k: expected an integer >= 0 (shots per prompt), got {k!r}")
        self.k = k
        self.shot_seed = shot_seed
        self.shots_path = shots_path
        self.prompt = FewShotPrompt(template, shot_template, show_gold)
        # cache_dir None: an in-memory cache, for this object only.
        self.cache = ResponseCache(Path(cache_dir).expanduser() / CACHE_FILE if cache_dir is not None else None)
        self.shots: list[Shot] | None = None  # set by prepare()

    def prepare(self, shots: Sequence[tuple[QAExample, str, str]] = ()) -> None:
        """Choose the ``k`` shots of the prompt from human-annotated (example, prediction, feedback)
        triples; with none given, from ``shots_path``; with neither, prompt zero-shot (warned)."""
        pool = [Shot(ex.context, ex.question, prediction, feedback, ex.answers) for ex, prediction, feedback in shots]
        where = "the human-annotated examples"
        if not pool and self.shots_path:
            pool, where = load_shots(self.shots_path), str(self.shots_path)
        if not pool and self.k > 0:
            log.warning("%s: no human-annotated examples and no shots_path: prompting zero-shot", self.name)
        elif len(pool) < self.k:
            log.warning("%s: only %d shots in %s for k=%d: using them all", self.name, len(pool), where, self.k)
        self.shots = select_shots(pool, self.k, self.shot_seed)
        log.info("%s: %d-shot prompt from %s", self.name, len(self.shots), where)

    def annotate(self, ex: QAExample, prediction: str) -> str:
        return self.annotate_many([(ex, prediction)], progress=False)[0]

    def annotate_many(self, items: Sequence[tuple[QAExample, str]], progress: bool = True) -> list[str]:
        """Feedback on each (example, prediction), in order. Cached responses are reused; the rest are
        requested and each is committed to the cache as soon as it arrives."""
        if self.shots is None:
            self.prepare()
        requests = []
        for ex, prediction in items:
            prompt = self.prompt.render(ex, prediction, self.shots)
            requests.append(_Request(self.cache.key(**self._key_parts(), prompt=prompt), prompt, ex, prediction))
        responses = self.cache.get_many(r.key for r in requests)
        todo = list({r.key: r for r in requests if r.key not in responses}.values())  # each prompt once
        if todo:
            hits = len(requests) - len(todo)
            log.info("%s: %d of %d from the cache, %d to request", self.name, hits, len(requests), len(todo))
            for key, response in self._complete(todo, progress):
                responses[key] = self.cache.put(key, response, self.name)
        return [extract_feedback(responses[r.key]) for r in requests]

    def _key_parts(self) -> dict:
        """Everything but the prompt that determines a response (never a secret)."""
        raise NotImplementedError

    def _complete(self, requests: Sequence[_Request], progress: bool) -> Iterator[tuple[str, str]]:
        """(key, raw response) for every request, yielded as each one is done."""
        raise NotImplementedError


class OpenAIAnnotator(_FewShotAnnotator):
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama); the
    prompt goes as one user message.

    The API key is read from the environment variable ``api_key_env`` only, and is never logged, cached
    or stored in a config; when it is unset the placeholder "EMPTY" is sent, which local servers accept.
    Up to ``max_concurrency`` requests run at once. 429, 5xx (and 408, 409), timeouts, connection
    errors and malformed responses (no choices, empty content, a body that is not JSON) are retried
    ``max_retries`` times with exponential back-off (``backoff_base`` * 2^attempt, capped at
    ``backoff_max``, with jitter; a Retry-After header is honoured within the cap); other errors (401,
    404, ...) fail at once. ``check()`` (the pipeline calls it first) fails fast on an unreachable URL.
    The cache key holds the base URL, model, prompt, temperature and max tokens."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 96,
        k: int = 4,
        shot_seed: int = 0,
        shots_path: str | None = None,
        template: str | None = None,
        shot_template: str | None = None,
        max_concurrency: int = 4,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        timeout: float = 30.0,
        cache_dir: str | Path | None = None,
        show_gold: bool = True,
    ):
        import openai

        if not urlparse(str(base_url)).scheme.startswith("http"):
            raise ConfigError(f"feedback.synthetic.base_url: expected an http(s) URL, got {base_url!r}")
        if not model:
            raise ConfigError("feedback.synthetic.model: a model name is required")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"feedback.synthetic.max_concurrency: expected an integer >= 1, got {max_concurrency!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"feedback.synthetic.max_retries: expected an integer >= 0, got {max_retries!r}")
        self.name = f"openai:{model}"
        super().__init__(k, shot_seed, shots_path, template, shot_template, show_gold, cache_dir)
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self._key_set = bool(os.environ.get(api_key_env))
        # The key lives only in the client; the client's own retries are off, ours are below.
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            max_retries=0,
            timeout=timeout,
        )
        self._checked = False
        self._rng = random.Random()  # back-off jitter only
        self._rng_lock = threading.Lock()

    def _key_parts(self) -> dict:
        return dict(
            kind="openai",
            base_url=self.base_url,
            model=self.model,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )

    def check(self) -> None:
        """Fail now, with one clear line, when the endpoint cannot be used: one GET /models without
        retries (any HTTP answer but 401/403 counts as reachable)."""
        import openai

        if not self._key_set:
            if urlparse(self.base_url).hostname == "api.openai.com":
                raise ConfigError(
                    f"feedback.synthetic.api_key_env: ${self.api_key_env} is not set; the OpenAI API needs a key "
                    f"(export {self.api_key_env}=...)"
                )
            log.info("%s: $%s is not set: sending the placeholder key 'EMPTY' (local servers)", self.name, self.api_key_env)
        timeout = min(self.timeout, 10.0)
        try:
            listed = [m.id for m in self.client.models.list(timeout=timeout)]
        except openai.APIConnectionError as err:  # refused, DNS, TLS, or a timeout (APITimeoutError)
            reason = self._reason(err, timeout)
            raise ConfigError(f"feedback.synthetic.base_url={self.base_url}: cannot connect: {reason}") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise ConfigError(
                f"feedback.synthetic.api_key_env: {self.base_url} refused the key from ${self.api_key_env} "
                f"(HTTP {err.status_code})"
            ) from None
        except (openai.APIStatusError, openai.APIResponseValidationError, ValueError):
            listed = []  # reachable; some servers have no /models, or list them in another shape
        if listed and self.model not in listed:
            shown = ", ".join(listed[:10])
            log.warning("%s: %s does not list model %r (it lists %s)", self.name, self.base_url, self.model, shown)
        self._checked = True

    def _complete(self, requests: Sequence[_Request], progress: bool) -> Iterator[tuple[str, str]]:
        if not self._checked:
            self.check()
        stop = threading.Event()  # set on a failure or an interruption: requests in flight stop retrying
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="annotate") as pool:
            futures = {pool.submit(self._request, r.prompt, stop): r.key for r in requests}
            pending = set(futures)
            with tqdm(total=len(requests), desc=f"annotate ({self.name})", disable=not progress, mininterval=2) as bar:
                try:
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        failed = [f for f in done if f.exception() is not None]
                        for future in done:
                            if future.exception() is None:  # keep what succeeded, even beside a failure
                                yield futures[future], future.result()
                                bar.update()
                        if failed:
                            raise failed[0].exception()
                finally:
                    stop.set()
                    for future in pending:  # on failure or interruption, send nothing more
                        future.cancel()

    def _request(self, prompt: str, stop: threading.Event) -> str:
        """One chat completion, retried on transient failures (until ``stop`` is set)."""
        import openai

        last, tries = "", 0
        for attempt in range(self.max_retries + 1):
            tries += 1
            retry_after = None
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
                choices = getattr(response, "choices", None)
                if not choices:
                    last = "malformed response: no choices"
                elif not (choices[0].message and (choices[0].message.content or "").strip()):
                    last = "malformed response: empty message content"
                else:
                    return choices[0].message.content
            except openai.APIConnectionError as err:  # includes APITimeoutError
                last = self._reason(err, self.timeout)
            except openai.APIStatusError as err:
                if err.status_code not in (408, 409, 429) and err.status_code < 500:
                    raise AnnotationError(
                        f"{self.name}: {self.base_url}/chat/completions answered HTTP {err.status_code}: "
                        f"{self._redact(str(err.message))}"
                    ) from None
                last = f"HTTP {err.status_code}"
                retry_after = _retry_after(err.response.headers.get("retry-after"))
            except (ValueError, openai.APIResponseValidationError) as err:  # a body that is not JSON
                last = f"malformed response: {type(err).__name__}"
            log.debug("%s: try %d failed (%s)", self.name, tries, last)
            if attempt < self.max_retries and stop.wait(self._delay(attempt, retry_after)):
                break
        raise AnnotationError(f"{self.name}: {self.base_url}/chat/completions failed {tries} times; last: {last}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        step = min(self.backoff_max, self.backoff_base * 2**attempt)
        with self._rng_lock:
            delay = step / 2 + self._rng.uniform(0, step / 2)  # jitter spreads out concurrent retries
        return min(self.backoff_max, max(delay, retry_after or 0.0))

    def _reason(self, err: Exception, timeout: float) -> str:
        import openai

        if isinstance(err, openai.APITimeoutError):
            return f"no answer within {timeout:g} s (timeout)"
        cause = err.__cause__ or err
        return self._redact(f"{type(cause).__name__}: {cause}")

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, the back-off applies
        return None


class HFFewShotAnnotator(_FewShotAnnotator):
    """A local transformers causal LM, prompted few-shot and decoded greedily in left-padded batches
    (``laffi_exp.answer.generate``); the feedback is the first line of the completion.

    The model is loaded like a base model (``laffi_exp.models.pretrained.PretrainedBase``: a local
    folder, or a hub id from the hub or the local Hugging Face cache, a pad token added when missing),
    and only when some response is not cached. A prompt longer than the model's window (less
    ``max_new_tokens``) first loses shots, last ones first, down to zero-shot; if still too long, its
    passage is cut around the reference answer (``laffi_exp.data.window.fit_contexts``). The cache key
    holds the model (path and a fingerprint of its files, ``laffi_exp.cache.weights_fingerprint``), the full
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

    def _complete(self, requests: Sequence[_Request], progress: bool) -> Iterator[tuple[str, str]]:
        from laffi_exp.answer import generate

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

    def _fit(self, request: _Request, base) -> str:
        """The prompt to generate from: ``request.prompt`` if it fits the window, else with fewer shots,
        else zero-shot with the passage cut."""
        from laffi_exp.data.window import fit_contexts

        tokenizer = base.tokenizer
        budget = _window(base.model, tokenizer) - self.max_new_tokens
        shots = self.shots or []
        for n in range(len(shots), -1, -1):
            prompt = request.prompt if n == len(shots) else self.prompt.render(request.ex, request.prediction, shots[:n])
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
        raise ConfigError("feedback.synthetic." + text[len("model.") :] if text.startswith("model.") else text) from None


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _window(model, tokenizer) -> int:
    """Tokens the model can attend to: its position limit, or the tokenizer's when smaller."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**7]  # tokenizers say 1e30 for "unknown"
    return min(limits) if limits else 2048

