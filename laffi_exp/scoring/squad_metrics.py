"""SQuAD 2.0 scoring (exact match, token F1, HasAns/NoAns split, no-answer thresholds).

Gives the numbers of the official ``evaluate-v2.0.py``, for a SQuAD JSON file or for in-memory examples.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "best_scores",
    "compute_exact",
    "compute_f1",
    "evaluate",
    "golds_from_dataset",
    "is_correct",
    "missing_ids",
    "normalize_answer",
    "score_examples",
]

# Word boundaries as Python's ``re`` sees them: "the" inside "theory" or "other" is kept.
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
# ASCII punctuation only, like the official script: curly quotes and other Unicode marks stay.
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    The order matters and is the official one: punctuation goes before articles, so
    "the-end" becomes "theend" (one word, no article left to remove).
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def compute_exact(a_gold: str, a_pred: str) -> int:
    """1 if the two answers are equal after normalisation, else 0."""
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """Token-overlap F1 between two answers (bag of normalised tokens).

    When either side has no tokens (a no-answer), F1 is 1.0 if both have none, else 0.0.
    """
    gold_tokens = normalize_answer(a_gold).split()
    pred_tokens = normalize_answer(a_pred).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    common = collections.Counter(gold_tokens) & collections.Counter(pred_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_scores(golds: Sequence[str], prediction: str) -> tuple[int, float]:
    """One question's exact match and F1: the best over its gold texts (none: unanswerable, only ""
    is right). Gold texts that normalise to nothing ("The", "...") leave the question with only the
    empty answer, even though it still counts as HasAns: the official script does the same."""
    references = [a for a in golds if normalize_answer(a)] or [""]
    return max(compute_exact(a, prediction) for a in references), max(compute_f1(a, prediction) for a in references)


def is_correct(example: Any, prediction: str) -> bool:
    """Whether ``prediction`` is an exact match for the question of ``example`` (a QAExample)."""
    return best_scores(example.answers, prediction)[0] == 1


def golds_from_dataset(dataset: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Map each question id of a SQuAD ``data`` list to its gold answer texts ([] = unanswerable).

    Ids keep their first position in the file; a repeated id takes its last answers, as the
    official script's dicts do. Raises ValueError naming the first malformed entry.
    """
    if not isinstance(dataset, list):
        raise ValueError(f"'data' must be a list of articles, got {type(dataset).__name__}")
    golds: dict[str, list[str]] = {}
    for i, article in enumerate(dataset):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise ValueError(f"data[{i}]: expected an object with a 'paragraphs' list")
        for j, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                raise ValueError(f"data[{i}].paragraphs[{j}]: expected an object with a 'qas' list")
            for k, qa in enumerate(qas):
                where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("id"), str):
                    raise ValueError(f"{where}: expected an object with a string 'id'")
                answers = qa.get("answers")
                if not isinstance(answers, list) or not all(
                    isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers
                ):
                    raise ValueError(f"{where}: expected 'answers' to be a list of objects with a string 'text'")
                golds[qa["id"]] = [a["text"] for a in answers]
    return golds


def missing_ids(dataset: Sequence[Mapping[str, Any]], preds: Mapping[str, str]) -> list[str]:
    """Question ids of the dataset that have no prediction, in dataset order."""
    return [qid for qid in golds_from_dataset(dataset) if qid not in preds]


def evaluate(
    dataset: Sequence[Mapping[str, Any]],
    preds: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, Any]:
    """Score predictions against a SQuAD 2.0 ``data`` list; see :func:`score_examples`."""
    return score_examples(golds_from_dataset(dataset), preds, na_probs, na_prob_thresh)


def score_examples(
    golds: Mapping[str, Sequence[str]],
    preds: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, Any]:
    """The official SQuAD 2.0 metric dict for ``golds`` (qid -> gold texts, empty = unanswerable).

    Keys, in order: ``exact``, ``f1``, ``total``; then ``HasAns_*`` and ``NoAns_*`` (each only when
    that split has questions); then, only when ``na_probs`` is given, ``best_exact``,
    ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh``. A prediction whose no-answer
    probability is above ``na_prob_thresh`` counts as "no answer".

    Questions without a prediction (see :func:`missing_ids`) score 0 and stay in every total
    (for ``best_*`` too: they are right at no threshold).
    The official script cannot score that case at all (it raises KeyError), so with no missing
    predictions the numbers are the official ones to the last digit. Predictions for ids not in
    ``golds`` are ignored.
    """
    if not golds:
        raise ValueError("no questions to score")
    has_ans = {qid: bool(answers) for qid, answers in golds.items()}

    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, answers in golds.items():
        if qid not in preds:
            continue
        pred = preds[qid]
        if not isinstance(pred, str):
            raise TypeError(f"prediction for {qid!r} must be a str, got {type(pred).__name__}")
        exact_raw[qid], f1_raw[qid] = best_scores(answers, pred)

    # Without probabilities nothing is above the default threshold, as in the official script.
    probs = na_probs if na_probs is not None else dict.fromkeys(preds, 0.0)
    lacking = [qid for qid in exact_raw if qid not in probs]
    if lacking:
        raise ValueError(f"no-answer probability missing for {len(lacking)} predicted question(s), e.g. {lacking[0]!r}")

    exact = _apply_no_answer_threshold(exact_raw, golds, probs, has_ans, na_prob_thresh)
    f1 = _apply_no_answer_threshold(f1_raw, golds, probs, has_ans, na_prob_thresh)

    result = _summary(exact, f1, list(golds))
    splits = {
        "HasAns": [qid for qid, answerable in has_ans.items() if answerable],
        "NoAns": [qid for qid, answerable in has_ans.items() if not answerable],
    }
    for prefix, qids in splits.items():
        if qids:
            for key, value in _summary(exact, f1, qids).items():
                result[f"{prefix}_{key}"] = value
    if na_probs is not None:
        total = len(golds)
        result["best_exact"], result["best_exact_thresh"] = _best_threshold(exact_raw, preds, na_probs, has_ans, total)
        result["best_f1"], result["best_f1_thresh"] = _best_threshold(f1_raw, preds, na_probs, has_ans, total)
    return result


def _apply_no_answer_threshold(
    raw: Mapping[str, float],
    golds: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float],
    has_ans: Mapping[str, bool],
    na_prob_thresh: float,
) -> dict[str, float]:
    """Per-question scores for every gold qid: "no answer" where the probability is above the
    threshold (1.0 on unanswerable questions, 0.0 on answerable ones), 0 where nothing was predicted."""
    scores: dict[str, float] = {}
    for qid in golds:
        if qid not in raw:
            scores[qid] = 0
        elif na_probs[qid] > na_prob_thresh:
            scores[qid] = float(not has_ans[qid])
        else:
            scores[qid] = raw[qid]
    return scores


def _summary(exact: Mapping[str, float], f1: Mapping[str, float], qids: list[str]) -> dict[str, Any]:
    # Built-in sum, in dataset order and as 100.0 * sum / n: the float result then matches the
    # official script bit for bit (fsum or another order could differ in the last digit).
    n = len(qids)
    return {
        "exact": 100.0 * sum(exact[q] for q in qids) / n,
        "f1": 100.0 * sum(f1[q] for q in qids) / n,
        "total": n,
    }


def _best_threshold(
    raw: Mapping[str, float],
    preds: Mapping[str, str],
    na_probs: Mapping[str, float],
    has_ans: Mapping[str, bool],
    total: int,
) -> tuple[float, float]:
    """The best score over all no-answer thresholds, and the threshold that first reaches it.

    Start from "every prediction is replaced by no-answer" (right exactly on the unanswerable
    questions), then keep the predictions one by one in increasing no-answer probability. The sort
    is Python's stable sort over the keys of ``na_probs``, so equal probabilities keep the order
    of that mapping, and only a strict improvement moves the threshold, as in the official script.
    """
    score: float = sum(1 for qid in raw if not has_ans[qid])
    best_score, best_thresh = score, 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in raw:
            continue
        if has_ans[qid]:
            score += raw[qid]
        elif preds[qid]:
            # A non-empty prediction on an unanswerable question is wrong once it is kept, even
            # one that normalises to nothing: the official script tests the raw string.
            score -= 1
        if score > best_score:
            best_score, best_thresh = score, na_probs[qid]
    return 100.0 * best_score / total, best_thresh
