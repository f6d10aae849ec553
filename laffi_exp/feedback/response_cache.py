"""A persistent cache of annotator responses, shared by every run and process of a sweep.

One SQLite file (WAL mode, a busy timeout) maps a hash of what determines a response (annotator kind,
model, prompt, parameters) to the raw response text. Each response is committed the moment it is
stored, so an interrupted annotation pass, run again, asks only for what is still missing. Secrets
(an API key) are never part of a key nor stored. WAL needs a local file system (not NFS).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,      -- ResponseCache.key(...) of the request
    response TEXT NOT NULL,    -- the raw response text
    annotator TEXT NOT NULL,   -- who answered, e.g. "openai:gpt-4o-mini" (for people reading the file)
    created REAL NOT NULL      -- unix time
)
"""
SECRET_PARTS = ("api_key", "key", "token", "password", "secret")


class ResponseCache:
    """``key -> response`` in the SQLite file ``path`` (``None``: in memory, for this object only).

    Safe for several threads (one connection behind a lock) and several processes (each opens its own
    connection; SQLite serialises the writers, readers never block)."""

    def __init__(self, path: str | Path | None, busy_timeout_s: float = 60.0):
        self.path = Path(path).expanduser() if path is not None else None
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._connection()  # fail here, not at the first response, when the file cannot be opened

    @staticmethod
    def key(**parts: object) -> str:
        """The cache key of a request: a SHA-256 of its parts as canonical JSON. Parts named like a
        secret are refused, so that no key can be derived from (or betray) a credential."""
        secret = [name for name in parts if name.lower() in SECRET_PARTS]
        if secret:
            raise ValueError(
                f"ResponseCache.key: {secret[0]!r} looks like a secret and must not be part of a cache key"
            )
        text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork: a child process opens its own.
        if self._conn is None or self._pid != os.getpid():
            where = str(self.path) if self.path is not None else ":memory:"
            # Autocommit (isolation_level=None): every INSERT is its own transaction, committed at once.
            conn = sqlite3.connect(where, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            if self.path is not None:
                self._enable_wal(conn)
                conn.execute("PRAGMA synchronous = NORMAL")  # durable across a killed process in WAL mode
            conn.execute(SCHEMA)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Switching the journal mode can report "locked" without waiting while another process opens
        # the same new file; it is a one-time switch, so a short wait and retry is enough.
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._connection().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The cached responses among ``keys`` (absent keys are left out)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        with self._lock:
            conn = self._connection()
            for start in range(0, len(keys), 500):  # SQLite caps the number of ? parameters
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(conn.execute(f"SELECT key, response FROM responses WHERE key IN ({marks})", chunk))
        return found

    def put(self, key: str, response: str, annotator: str = "") -> str:
        """Store ``response`` under ``key``, committed at once. If another process stored one first, that
        one is kept; returns the response the cache holds, so every run sees one response per key."""
        with self._lock:
            conn = self._connection()
            conn.execute(
                "INSERT OR IGNORE INTO responses (key, response, annotator, created) VALUES (?, ?, ?, ?)",
                (key, response, annotator, time.time()),
            )
            return conn.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()[0]

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path) if self.path else ':memory:'!r})"
