"""Reading SQuAD-layout JSON (v1.1 or v2.0) into ``QAExample`` records, with schema checks that name
the file, the question id and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

from laffi_exp.errors import ConfigError
from laffi_exp.records import QAExample


def load_squad_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (expected a SQuAD-layout JSON file)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})")


def examples_from_squad(squad: dict, source: str = "<data>") -> list[QAExample]:
    """Flatten a SQuAD JSON object into examples, in file order. Raises ConfigError on schema errors:
    missing keys, duplicate ids, or an ``answer_start`` that does not point at the answer text."""
    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        raise ConfigError(f"{source}: expected a JSON object with a 'data' list (SQuAD layout)")
    examples: list[QAExample] = []
    seen: set[str] = set()
    for a, article in enumerate(squad["data"]):
        title = article.get("title", f"article_{a}") if isinstance(article, dict) else None
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise ConfigError(f"{source}: data[{a}] has no 'paragraphs' list")
        for p, para in enumerate(paragraphs):
            where = f"{source}: data[{a}].paragraphs[{p}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                raise ConfigError(f"{where} has no 'context' string")
            if not isinstance(para.get("qas"), list):
                raise ConfigError(f"{where} has no 'qas' list")
            context = para["context"]
            for qa in para["qas"]:
                qid = qa.get("id") if isinstance(qa, dict) else None
                if not isinstance(qid, str) or not qid:
                    raise ConfigError(f"{where}: a question has no 'id'")
                if qid in seen:
                    raise ConfigError(f"{source}: duplicate question id {qid!r}")
                seen.add(qid)
                if not isinstance(qa.get("question"), str):
                    raise ConfigError(f"{source}: question {qid!r} has no 'question' string")
                answers = qa.get("answers", [])
                if qa.get("is_impossible", False):
                    answers = []
                texts, starts = [], []
                for ans in answers:
                    text, start = ans.get("text"), ans.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int):
                        raise ConfigError(f"{source}: question {qid!r} has an answer without 'text'/'answer_start'")
                    if context[start : start + len(text)] != text:
                        raise ConfigError(
                            f"{source}: question {qid!r}: answer_start {start} does not point at {text!r} in the context"
                        )
                    texts.append(text)
                    starts.append(start)
                examples.append(
                    QAExample(
                        id=qid,
                        title=str(title),
                        context=context,
                        question=qa["question"],
                        answers=tuple(texts),
                        answer_starts=tuple(starts),
                    )
                )
    return examples


class SquadJSON:
    """Any SQuAD-layout JSON file (SQuAD 2.0 or 1.1) as a pipeline data source.

    Train, validation and test questions come from disjoint articles of the one file (an
    article-level split, shuffled by ``seed``); each split is then subsampled to its size.
    """

    def __init__(self, path: str, name: str = "squad_json", seed: int = 0, num_train: int = 1000, num_val: int = 200, num_eval: int = 600):
        self.path = path
        self.name = name
        self.seed = seed
        self.sizes = {"train": num_train, "validation": num_val, "test": num_eval}

    def check(self) -> None:
        if not self.path or not Path(self.path).expanduser().is_file():
            raise ConfigError(f"dataset.path: {self.path!r} is not a file (expected a SQuAD-layout JSON file)")
        keys = {"train": "num_train", "validation": "num_val", "test": "num_eval"}
        for split, n in self.sizes.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(f"dataset.{keys[split]}: expected a positive integer, got {n!r}")

    def splits(self) -> dict[str, dict]:
        import random

        squad = load_squad_file(Path(self.path).expanduser())
        examples_from_squad(squad, source=str(self.path))  # schema check of the whole file first
        articles = list(squad["data"])
        random.Random(f"article-split/{self.seed}").shuffle(articles)
        out: dict[str, dict] = {}
        for split in ("test", "validation", "train"):
            want, taken = self.sizes[split], []
            while articles and sum(len(p["qas"]) for a in taken for p in a["paragraphs"]) < want:
                taken.append(articles.pop())
            out[split] = _subsample({"version": squad.get("version", ""), "data": taken}, want, f"{self.seed}/{split}")
        return {k: out[k] for k in ("train", "validation", "test")}


def _subsample(squad: dict, n: int, salt: str) -> dict:
    """Keep ``n`` questions chosen by a hash of (salt, id), in file order."""
    import hashlib

    ids = [qa["id"] for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]]
    keep = set(sorted(ids, key=lambda i: hashlib.sha256(f"{salt}/{i}".encode()).hexdigest())[:n])
    data = []
    for article in squad["data"]:
        paragraphs = []
        for p in article["paragraphs"]:
            qas = [qa for qa in p["qas"] if qa["id"] in keep]
            if qas:
                paragraphs.append({**p, "qas": qas})
        if paragraphs:
            data.append({**article, "paragraphs": paragraphs})
    return {"version": squad["version"], "data": data}
