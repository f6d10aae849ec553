"""The annotation app's SQLite store: the batch's items, who annotates which, every save and every edit.

One file per batch, in WAL mode; every call is its own transaction, committed before it returns, so a
killed server loses nothing it has acknowledged. Saves are optimistic: each (item, annotator) has a
revision, and a save that carries an older revision than the stored one is refused (``Conflict``), so
two tabs on one item never overwrite each other silently.

Assignment: an item goes to ``per_item`` annotators. An annotator who has nothing open claims the next
``chunk`` items (in batch order) that fewer than ``per_item`` annotators hold, so people who sign in
later share the rest of the batch, and with ``per_item`` K each item is seen by K different people.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from laffi_exp.annotation_app.batch import Batch, Item
from laffi_exp.core.errors import ConfigError

FORMAT = "laffi_exp.annotations/1"
STATUSES = ("open", "saved", "flagged")  # open: assigned, nothing saved; flagged: unclear, skipped for now
ANNOTATOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MAX_FEEDBACK, MAX_CORRECTION = 5000, 1000  # characters
MAX_SECONDS = 24 * 3600  # per save: more is a stuck clock, not work

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL UNIQUE,
    question TEXT NOT NULL, context TEXT NOT NULL, prediction TEXT NOT NULL, gold TEXT
);
CREATE TABLE annotators (id TEXT PRIMARY KEY, first_seen TEXT NOT NULL, last_seen TEXT NOT NULL);
CREATE TABLE annotations (
    item_id TEXT NOT NULL REFERENCES items(id),
    annotator_id TEXT NOT NULL REFERENCES annotators(id),
    status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'saved', 'flagged')),
    feedback TEXT NOT NULL DEFAULT '',
    correction TEXT NOT NULL DEFAULT '',
    revision INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    assigned_at TEXT NOT NULL,
    first_saved_at TEXT,
    updated_at TEXT,
    PRIMARY KEY (item_id, annotator_id)
);
CREATE TABLE edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL, annotator_id TEXT NOT NULL, revision INTEGER NOT NULL,
    action TEXT NOT NULL, status TEXT NOT NULL, feedback TEXT NOT NULL, correction TEXT NOT NULL,
    seconds REAL NOT NULL, at TEXT NOT NULL
);
CREATE INDEX annotations_by_annotator ON annotations (annotator_id, status);
"""


class NotFound(LookupError):
    """An unknown annotator, or an item not assigned to the annotator; the message says which."""


class Conflict(Exception):
    """A save carried a stale revision; ``current`` is the annotation as stored."""

    def __init__(self, message: str, current: dict[str, Any]):
        super().__init__(message)
        self.current = current


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """The annotations of one batch in one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def for_batch(
        cls, path: str | Path, batch: Batch, per_item: int | None = None, no_answer_text: str | None = None
    ) -> Store:
        """The store of ``batch`` at ``path``, created if absent; ConfigError if the file is not an
        annotation store or belongs to another batch. ``per_item`` (None: keep) may change between runs."""
        store = cls(path)
        if not store.path.exists():
            store._create(batch, per_item or 1, no_answer_text)
            return store
        meta = store.meta()
        if meta["batch_fingerprint"] != batch.fingerprint:
            raise ConfigError(
                f"--db {store.path}: holds the annotations of another batch ({meta['batch']}, {meta['items']} items), "
                f"not of {batch.path}: pass another --db (or the batch it was made for)"
            )
        with store._transaction() as con:
            con.execute("UPDATE meta SET value = ? WHERE key = 'batch'", (str(batch.path),))  # the batch may have moved
            if per_item is not None:
                con.execute("UPDATE meta SET value = ? WHERE key = 'per_item'", (str(per_item),))
            if no_answer_text is not None:
                con.execute("UPDATE meta SET value = ? WHERE key = 'no_answer_text'", (no_answer_text,))
        return store

    @classmethod
    def existing(cls, path: str | Path) -> Store:
        """An annotation store that must exist (``export-db``)."""
        store = cls(path)
        if not store.path.is_file():
            raise ConfigError(
                f"--db {store.path}: no such file (the store `serve` writes, BATCH.annotations.sqlite by default)"
            )
        store.meta()
        return store

    def _create(self, batch: Batch, per_item: int, no_answer_text: str | None) -> None:
        from laffi_exp.core.prompts import NO_ANSWER_TEXT

        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect()
        try:
            # WAL: readers never wait for a writer, and a commit is one append; the mode stays with the file.
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("BEGIN IMMEDIATE")
            # One statement at a time: executescript would commit, and the store would exist half made.
            for statement in filter(str.strip, SCHEMA.split(";")):
                con.execute(statement)
            meta = {
                "format": FORMAT,
                "batch": str(batch.path),
                "batch_fingerprint": batch.fingerprint,
                "items": str(len(batch.items)),
                "per_item": str(per_item),
                "created": now(),
                "no_answer_text": no_answer_text or NO_ANSWER_TEXT,
            }
            con.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            con.executemany(
                "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                [(i.id, n, i.question, i.context, i.prediction, i.gold) for n, i in enumerate(batch.items)],
            )
            con.execute("COMMIT")
        except BaseException:
            con.close()
            self.path.unlink(missing_ok=True)  # no half-made store is left to be mistaken for one
            raise
        con.close()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # transactions are explicit
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA synchronous = FULL")  # a commit is on disk when the save is acknowledged
        con.execute("PRAGMA foreign_keys = ON")
        return con

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction; IMMEDIATE takes the write lock up front, so two saves of one
        item are serialised and the revision check cannot race."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def meta(self) -> dict[str, str]:
        try:
            con = self._connect()
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            finally:
                con.close()
        except sqlite3.DatabaseError as err:  # not SQLite at all, or another SQLite file
            raise ConfigError(f"--db {self.path}: not an annotation store ({err})") from None
        if meta.get("format") != FORMAT:
            raise ConfigError(
                f"--db {self.path}: not an annotation store (format {meta.get('format')!r}, expected {FORMAT})"
            )
        return meta

    @property
    def per_item(self) -> int:
        return int(self.meta()["per_item"])

    # -- annotators and assignment -----------------------------------------------------------------
    def sign_in(self, annotator: str) -> str:
        """Record a sign-in (no password: the app is local); returns the id. ValueError for a bad id."""
        if not isinstance(annotator, str) or not ANNOTATOR_ID.fullmatch(annotator.strip()):
            raise ValueError("annotator id: expected 1-64 letters, digits or _.@- (starting with a letter or digit)")
        annotator, at = annotator.strip(), now()
        with self._transaction() as con:
            con.execute(
                "INSERT INTO annotators VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
                (annotator, at, at),
            )
        return annotator

    def queue(self, annotator: str, chunk: int = 20) -> list[dict[str, Any]]:
        """The items assigned to ``annotator``, in batch order; with none left open, the next ``chunk``
        unassigned ones are claimed first (in the same transaction, so two sign-ins never overfill an item)."""
        with self._transaction() as con:
            self._known(con, annotator)
            open_items = con.execute(
                "SELECT COUNT(*) FROM annotations WHERE annotator_id = ? AND status = 'open'", (annotator,)
            ).fetchone()[0]
            if open_items == 0:
                per_item = int(con.execute("SELECT value FROM meta WHERE key = 'per_item'").fetchone()[0])
                claim = con.execute(
                    """SELECT id FROM items
                       WHERE id NOT IN (SELECT item_id FROM annotations WHERE annotator_id = ?)
                         AND (SELECT COUNT(*) FROM annotations WHERE item_id = items.id) < ?
                       ORDER BY position LIMIT ?""",
                    (annotator, per_item, chunk),
                ).fetchall()
                at = now()
                con.executemany(
                    "INSERT INTO annotations (item_id, annotator_id, assigned_at) VALUES (?, ?, ?)",
                    [(row["id"], annotator, at) for row in claim],
                )
            rows = con.execute(
                """SELECT items.id, items.question, a.status, a.revision, a.feedback FROM annotations a
                   JOIN items ON items.id = a.item_id WHERE a.annotator_id = ? ORDER BY items.position""",
                (annotator,),
            ).fetchall()
        return [dict(row) for row in rows]

    def progress(self, annotator: str) -> dict[str, int]:
        """The annotator's counts, and the batch's: items with ``per_item`` saved annotations are complete."""
        con = self._connect()
        try:
            mine = dict(
                con.execute(
                    "SELECT status, COUNT(*) FROM annotations WHERE annotator_id = ? GROUP BY status", (annotator,)
                ).fetchall()
            )
            per_item = int(con.execute("SELECT value FROM meta WHERE key = 'per_item'").fetchone()[0])
            complete = con.execute(
                """SELECT COUNT(*) FROM (SELECT item_id FROM annotations WHERE status = 'saved'
                   GROUP BY item_id HAVING COUNT(*) >= ?)""",
                (per_item,),
            ).fetchone()[0]
            items = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        finally:
            con.close()
        counts = {s: mine.get(s, 0) for s in STATUSES}
        return {
            **counts,
            "assigned": sum(counts.values()),
            "batch_items": items,
            "batch_complete": complete,
            "per_item": per_item,
        }

    # -- one item ----------------------------------------------------------------------------------
    def item(self, annotator: str, item_id: str) -> dict[str, Any]:
        """The item and the annotator's annotation of it; NotFound unless it is assigned to them."""
        con = self._connect()
        try:
            row = con.execute(
                """SELECT items.*, a.status, a.feedback, a.correction, a.revision, a.seconds, a.updated_at,
                          (SELECT COUNT(*) FROM edits e
                           WHERE e.item_id = a.item_id AND e.annotator_id = a.annotator_id) AS edits
                   FROM annotations a JOIN items ON items.id = a.item_id
                   WHERE a.annotator_id = ? AND a.item_id = ?""",
                (annotator, item_id),
            ).fetchone()
        finally:
            con.close()
        if row is None:
            raise NotFound(f"item {item_id!r} is not assigned to {annotator!r}")
        return dict(row)

    def save(
        self,
        annotator: str,
        item_id: str,
        *,
        revision: int,
        feedback: str,
        correction: str = "",
        seconds: float = 0.0,
        status: str = "saved",
    ) -> dict[str, Any]:
        """Store the annotator's feedback (``status`` saved) or mark the item unclear (flagged), if
        ``revision`` is the stored one; the revision goes up by one, the edit is logged and ``seconds``
        (active time since the last save) adds to the item's time. Conflict on a stale revision,
        ValueError on bad values, NotFound if the item is not the annotator's."""
        feedback, correction = (
            _text(feedback, "feedback", MAX_FEEDBACK),
            _text(correction, "correction", MAX_CORRECTION),
        )
        if status not in ("saved", "flagged"):
            raise ValueError(f"status: expected saved or flagged, got {status!r}")
        if status == "saved" and not feedback:
            raise ValueError("feedback is empty: write it, or pick a template (keys 1, 2, 3)")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SECONDS:
            raise ValueError(f"seconds: expected a number of seconds in [0, {MAX_SECONDS}], got {seconds!r}")
        if isinstance(revision, bool) or not isinstance(revision, int):
            raise ValueError(f"revision: expected an integer, got {revision!r}")
        at = now()
        with self._transaction() as con:
            updated = con.execute(
                """UPDATE annotations SET status = ?, feedback = ?, correction = ?, revision = revision + 1,
                       seconds = seconds + ?, updated_at = ?,
                       first_saved_at = COALESCE(first_saved_at, CASE WHEN ? = 'saved' THEN ? END)
                   WHERE item_id = ? AND annotator_id = ? AND revision = ?""",
                (status, feedback, correction, float(seconds), at, status, at, item_id, annotator, revision),
            ).rowcount
            if not updated:
                current = con.execute(
                    "SELECT * FROM annotations WHERE item_id = ? AND annotator_id = ?", (item_id, annotator)
                ).fetchone()
                if current is None:
                    raise NotFound(f"item {item_id!r} is not assigned to {annotator!r}")
                raise Conflict(
                    f"not saved: item {item_id} was saved elsewhere (another tab?) since this page loaded it "
                    f"(revision {current['revision']} at {current['updated_at']}, this page had {revision})",
                    dict(current),
                )
            con.execute(
                "INSERT INTO edits"
                " (item_id, annotator_id, revision, action, status, feedback, correction, seconds, at)"
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item_id,
                    annotator,
                    revision + 1,
                    "save" if status == "saved" else "flag",
                    status,
                    feedback,
                    correction,
                    float(seconds),
                    at,
                ),
            )
            con.execute("UPDATE annotators SET last_seen = ? WHERE id = ?", (at, annotator))
        return self.item(annotator, item_id)

    # -- reading everything back -------------------------------------------------------------------
    def items(self) -> list[Item]:
        con = self._connect()
        try:
            rows = con.execute("SELECT id, question, context, prediction, gold FROM items ORDER BY position").fetchall()
        finally:
            con.close()
        return [Item(**dict(r)) for r in rows]

    def annotations(self) -> list[dict[str, Any]]:
        """Every assigned (item, annotator), in batch order, then by the time of the first save."""
        con = self._connect()
        try:
            rows = con.execute(
                """SELECT a.*, items.prediction, items.question FROM annotations a JOIN items ON items.id = a.item_id
                   ORDER BY items.position, a.first_saved_at IS NULL, a.first_saved_at, a.annotator_id"""
            ).fetchall()
        finally:
            con.close()
        return [dict(r) for r in rows]

    def edits(self, item_id: str | None = None) -> list[dict[str, Any]]:
        con = self._connect()
        try:
            where, args = ("WHERE item_id = ?", (item_id,)) if item_id is not None else ("", ())
            rows = con.execute(f"SELECT * FROM edits {where} ORDER BY id", args).fetchall()
        finally:
            con.close()
        return [dict(r) for r in rows]

    def annotators(self) -> list[str]:
        con = self._connect()
        try:
            return [r[0] for r in con.execute("SELECT id FROM annotators ORDER BY first_seen, id")]
        finally:
            con.close()

    def _known(self, con: sqlite3.Connection, annotator: str) -> None:
        if con.execute("SELECT 1 FROM annotators WHERE id = ?", (annotator,)).fetchone() is None:
            raise NotFound(f"annotator {annotator!r} has not signed in")


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected text, got {type(value).__name__}")
    value = value.strip()
    if len(value) > limit:
        raise ValueError(f"{name}: {len(value)} characters, at most {limit}")
    return value
