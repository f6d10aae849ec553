"""The synthetic feedback pool from real LLMs: an annotator prompted few-shot with k human-annotated
examples, either any OpenAI-compatible chat-completions endpoint (``feedback/synthetic=openai``,
``feedback.openai_chat``) or a local transformers causal LM (``feedback/synthetic=hf_fewshot``,
``feedback.hf_fewshot``). What they share is here: the prompt, the shots, the response cache.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.hashing import unit_hash
from laffi_exp.core.io import read_jsonl
from laffi_exp.core.prompts import NO_ANSWER_TEXT
from laffi_exp.core.records import QAExample
from laffi_exp.feedback.base import Annotator
from laffi_exp.feedback.response_cache import ResponseCache

log = logging.getLogger(__name__)

TEMPLATE = (
    'Give feedback on the answer to a question about a passage. Begin with a verdict, "Correct." or '
    '"Incorrect.". When the answer is incorrect, give the right answer as: The answer is "..."; or, '
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
        template.format(**dict.fromkeys(allowed, ""))
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"feedback.synthetic.{key}: bad placeholder ({type(err).__name__}: {err}); allowed: "
            + " ".join("{" + f + "}" for f in allowed)
        ) from None


@dataclass(frozen=True)
class Request:
    key: str
    prompt: str
    ex: QAExample
    prediction: str


class FewShotAnnotator(Annotator):
    """What both LLM annotators share: shot selection, prompts, and the cache around every call.
    Subclasses set ``name`` and implement ``check``, ``_key_parts`` and ``_complete``."""

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
            requests.append(Request(self.cache.key(**self._key_parts(), prompt=prompt), prompt, ex, prediction))
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

    def _complete(self, requests: Sequence[Request], progress: bool) -> Iterator[tuple[str, str]]:
        """(key, raw response) for every request, yielded as each one is done."""
        raise NotImplementedError
