"""The two SQuAD data sources of the pipeline: ``SquadJSON`` (any one file) and ``SquadV2`` (the official
files, downloaded when absent), each split into train, validation and test by article or by file, with
stratified subsampling. Reading and checking the files is ``data.squad_format``."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

from laffi_exp.core.errors import ConfigError
from laffi_exp.data.base import SIZE_KEYS, DataSource, check_sizes
from laffi_exp.data.squad_format import (
    answers_of,
    download,
    drop_bad_answers,
    load_squad_file,
    offline,
    offline_settings,
)

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
TRAIN_FILE = "train-v2.0.json"
DEV_FILE = "dev-v2.0.json"


class _SquadSource(DataSource):
    """What the SQuAD data sources share: sizes and settings checks, reading a file (dropping and
    counting questions with bad answers), and the article-level split with stratified subsampling.

    After ``splits()``: ``chosen_ids()`` gives the question ids of each split, ``skipped`` the number of
    questions dropped for bad answers (their ids in ``skipped_ids``), ``files`` the files read and
    ``split_by_used`` the split made (``article`` or ``file``).
    """

    def __init__(self, name: str, seed: int, num_train: int, num_val: int, num_eval: int, on_bad_answer: str):
        self.name = name
        self.seed = seed
        self.sizes = {"train": num_train, "validation": num_val, "test": num_eval}
        self.on_bad_answer = on_bad_answer
        self.skipped_ids: list[str] = []
        self.files: list[str] = []
        self.split_by_used: str | None = None
        self._chosen: dict[str, list[str]] | None = None

    @property
    def skipped(self) -> int:
        """How many questions were dropped because their answers do not match their context."""
        return len(self.skipped_ids)

    def chosen_ids(self) -> dict[str, list[str]]:
        """The question ids of each split (train, validation, test), in file order."""
        if self._chosen is None:
            self.splits()
        return {split: list(ids) for split, ids in self._chosen.items()}

    def splits(self) -> dict[str, dict]:
        raise NotImplementedError

    def _check_settings(self) -> None:
        check_sizes(self.sizes)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"dataset.seed: expected an integer, got {self.seed!r}")
        if self.on_bad_answer not in ("error", "skip"):
            raise ConfigError(f"dataset.on_bad_answer: expected 'error' or 'skip', got {self.on_bad_answer!r}")

    def _start(self) -> None:
        self.skipped_ids, self.files, self._chosen = [], [], None

    def _read(self, path: Path, squad: dict | None = None) -> dict:
        if squad is None:
            squad = load_squad_file(path)
        squad, skipped = drop_bad_answers(squad, str(path), self.on_bad_answer)
        if skipped:
            log.warning(
                "%s: skipped %d question(s) whose answers do not match their context "
                "(dataset.on_bad_answer=skip), e.g. %s",
                path,
                len(skipped),
                ", ".join(skipped[:5]),
            )
        self.skipped_ids += skipped
        self.files.append(str(path))
        return squad

    def _split(self, plan: list[tuple[str, dict, tuple[str, ...]]]) -> dict[str, dict]:
        """``plan``: (file label, its data, the splits drawn from it in order). The file's articles are
        shuffled by the seed; each split takes just enough of the next articles to fill its
        subsample (so the test split depends on nothing but the seed and its size), the last takes all
        that are left. Each subsample keeps the file's unanswerable share."""
        out: dict[str, dict] = {}
        self._chosen = {}
        for label, squad, order in plan:
            articles = [_counted(article) for article in squad["data"]]
            random.Random(f"article-split/{self.seed}").shuffle(articles)
            answerable = sum(c[0] for _, c in articles)
            unanswerable = sum(c[1] for _, c in articles)
            total, used = answerable + unanswerable, []
            for i, split in enumerate(order):
                key, n = f"dataset.{SIZE_KEYS[split]}", self.sizes[split]
                if n > total:
                    raise ConfigError(
                        f"{key}: {n} questions asked for, but {label} has only {total} "
                        f"({answerable} answerable, {unanswerable} unanswerable)"
                    )
                quota = {True: int(n * unanswerable / total + 0.5)}
                quota[False] = n - quota[True]
                taken, have = [], [0, 0]
                while articles and (i == len(order) - 1 or have[0] < quota[False] or have[1] < quota[True]):
                    article, counts = articles.pop(0)
                    taken.append(article)
                    have = [have[0] + counts[0], have[1] + counts[1]]
                if have[0] < quota[False] or have[1] < quota[True]:
                    after = f" left after the {' and '.join(used)} split{'s' if len(used) > 1 else ''}" if used else ""
                    raise ConfigError(
                        f"{key}: {n} questions asked for ({quota[False]} answerable, {quota[True]} unanswerable, "
                        f"as in {label}), but the articles of {label}{after} have only {sum(have)} "
                        f"({have[0]} answerable, {have[1]} unanswerable)"
                    )
                used.append(split)
                out[split], self._chosen[split] = _subsample(squad, taken, quota, f"{self.seed}/{split}")
        return {split: out[split] for split in SIZE_KEYS}


def _counted(article: dict) -> tuple[dict, tuple[int, int]]:
    """An article with its (answerable, unanswerable) question counts."""
    flags = [not answers_of(qa) for para in article["paragraphs"] for qa in para["qas"]]
    return article, (flags.count(False), flags.count(True))


def _subsample(squad: dict, articles: list[dict], quota: dict[bool, int], salt: str) -> tuple[dict, list[str]]:
    """Keep ``quota[unanswerable]`` questions of each kind from ``articles``, chosen by a hash of
    (salt, id) and kept in file order (articles in the order of ``squad``); returns the data and ids."""

    def rank(qid: str) -> str:
        return hashlib.sha256(f"{salt}/{qid}".encode()).hexdigest()

    qas = [qa for article in articles for para in article["paragraphs"] for qa in para["qas"]]
    keep: set[str] = set()
    for unanswerable, k in quota.items():
        keep.update(sorted((qa["id"] for qa in qas if (not answers_of(qa)) == unanswerable), key=rank)[:k])
    taken = {id(article) for article in articles}
    data, ids = [], []
    for article in squad["data"]:
        if id(article) not in taken:
            continue
        paragraphs = []
        for para in article["paragraphs"]:
            kept = [qa for qa in para["qas"] if qa["id"] in keep]
            ids += [qa["id"] for qa in kept]
            if kept:
                paragraphs.append({**para, "qas": kept})
        if paragraphs:
            data.append({**article, "paragraphs": paragraphs})
    return {"version": squad.get("version", ""), "data": data}, ids


class SquadJSON(_SquadSource):
    """Any SQuAD-layout JSON file (SQuAD 2.0, or 1.1 where no ``is_impossible`` means answerable) as
    a pipeline data source: test, validation and train questions come from disjoint articles of the
    one file (shuffled by ``seed``), each subsampled to its size with the file's unanswerable share."""

    def __init__(
        self,
        path: str,
        name: str = "squad_json",
        seed: int = 0,
        num_train: int = 1000,
        num_val: int = 200,
        num_eval: int = 600,
        on_bad_answer: str = "skip",
    ):
        super().__init__(name, seed, num_train, num_val, num_eval, on_bad_answer)
        self.path = path

    def check(self) -> None:
        self._check_settings()
        if not self.path or not Path(self.path).expanduser().is_file():
            raise ConfigError(f"dataset.path: {self.path!r} is not a file (expected a SQuAD-layout JSON file)")

    def splits(self) -> dict[str, dict]:
        self._start()
        path = Path(self.path).expanduser()
        squad = self._read(path)
        self.split_by_used = "article"
        return self._split([(path.name, squad, ("test", "validation", "train"))])


class SquadV2(_SquadSource):
    """The official SQuAD 2.0 files (``train-v2.0.json``, ``dev-v2.0.json``) as a pipeline data source.

    A file is looked up in ``path``, then in ``cache_dir``; an absent one is downloaded from
    ``base_url`` into ``cache_dir`` unless offline (LAFFI_OFFLINE=1 or HF_HUB_OFFLINE=1).
    ``split_by=file``: train and validation (held-out articles) from the train file, test from the dev
    file. ``split_by=article``: test, validation and train from disjoint articles of the dev file.
    ``split_by=auto``: ``file`` when the train file is here or downloads are on (a failed download is
    then an error, not a silent change of split), else ``article``.
    """

    def __init__(
        self,
        path: str | None = None,
        cache_dir: str | None = None,
        name: str = "squad_v2",
        seed: int = 0,
        num_train: int = 1000,
        num_val: int = 200,
        num_eval: int = 600,
        split_by: str = "auto",
        on_bad_answer: str = "skip",
        base_url: str = OFFICIAL_URL,
        download_timeout: float = 10.0,
    ):
        super().__init__(name, seed, num_train, num_val, num_eval, on_bad_answer)
        self.path = path
        self.cache_dir = cache_dir
        self.split_by = split_by
        self.base_url = base_url
        self.download_timeout = download_timeout

    def check(self) -> None:
        """Settings, folders, and (offline) that the files the split needs are here; reads no file."""
        self._check_settings()
        if self.split_by not in ("auto", "file", "article"):
            raise ConfigError(f"dataset.split_by: expected 'auto', 'file' or 'article', got {self.split_by!r}")
        if (
            isinstance(self.download_timeout, bool)
            or not isinstance(self.download_timeout, (int, float))
            or self.download_timeout <= 0
        ):
            raise ConfigError(
                f"dataset.download_timeout: expected a number of seconds > 0, got {self.download_timeout!r}"
            )
        if self.path and not Path(self.path).expanduser().is_dir():
            raise ConfigError(
                f"dataset.path: {self.path!r} is not a folder "
                f"(expected the folder holding {TRAIN_FILE} and/or {DEV_FILE})"
            )
        if (
            self.cache_dir
            and Path(self.cache_dir).expanduser().exists()
            and not Path(self.cache_dir).expanduser().is_dir()
        ):
            raise ConfigError(f"dataset.cache_dir: {self.cache_dir!r} exists but is not a folder")
        if not self.path and not self.cache_dir:
            raise ConfigError(
                "dataset.path / dataset.cache_dir: set at least one folder to read the SQuAD 2.0 files from"
            )
        if offline():
            needed = [DEV_FILE] + ([TRAIN_FILE] if self.split_by == "file" else [])
            for file in needed:
                if self._local(file) is None:
                    raise self._missing(file, f"downloads are off ({' and '.join(offline_settings())})")

    def splits(self) -> dict[str, dict]:
        self._start()
        dev = self._read(*self._fetch(DEV_FILE))
        split_by = self.split_by
        if split_by == "auto":
            split_by = "file" if self._local(TRAIN_FILE) is not None or not offline() else "article"
            if split_by == "article":
                log.info("%s is not here and downloads are off: article-level split of %s", TRAIN_FILE, DEV_FILE)
        self.split_by_used = split_by
        if split_by == "article":
            return self._split([(DEV_FILE, dev, ("test", "validation", "train"))])
        train = self._read(*self._fetch(TRAIN_FILE))
        return self._split([(TRAIN_FILE, train, ("validation", "train")), (DEV_FILE, dev, ("test",))])

    def _folders(self) -> list[Path]:
        return [Path(d).expanduser() for d in (self.path, self.cache_dir) if d]

    def _local(self, file: str) -> Path | None:
        return next((d / file for d in self._folders() if (d / file).is_file()), None)

    def _fetch(self, file: str) -> tuple[Path, dict | None]:
        """The local copy of ``file`` (and its data when it was just downloaded)."""
        local = self._local(file)
        if local is not None:
            return local, None
        if offline():
            raise self._missing(file, f"downloads are off ({' and '.join(offline_settings())})")
        if not self.cache_dir:
            raise self._missing(file, "dataset.cache_dir is not set, so it cannot be downloaded")
        url = self.base_url.rstrip("/") + "/" + file
        destination = Path(self.cache_dir).expanduser() / file
        log.info("Downloading %s to %s", url, destination)
        try:
            return destination, download(url, destination, float(self.download_timeout))
        except OSError as err:
            raise self._missing(file, f"the download from {url} failed ({err})") from err

    def _missing(self, file: str, reason: str) -> ConfigError:
        folders = " or ".join(
            f"{key} ({d})" for key, d in (("dataset.path", self.path), ("dataset.cache_dir", self.cache_dir)) if d
        )
        target = Path(self.path or self.cache_dir).expanduser() / file
        hint = f"; or set dataset.split_by=article to use only {DEV_FILE}" if file == TRAIN_FILE else ""
        return ConfigError(
            f"dataset: {file} is missing: it is not in {folders}, and {reason}. "
            f"Put the official file ({OFFICIAL_URL}{file}) at {target}{hint}"
        )
