"""The batch manifest: SQLite in WAL mode in the output folder; every state change one committed transaction."""

from __future__ import annotations

import json
import os
import sqlite3
import threading

from ...pipelines.errors import Flux2KitError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None

MANIFEST = "batch.sqlite"
LOCK = "batch.lock"



class Manifest:
    """``DIR/batch.sqlite``: each job's inputs, target, prompt id, state, attempts and outputs."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE IF NOT EXISTS jobs (
        job INTEGER PRIMARY KEY, name TEXT NOT NULL, row INTEGER, fingerprint TEXT NOT NULL, inputs TEXT NOT NULL,
        state TEXT NOT NULL, target TEXT, prompt_id TEXT, attempts INTEGER NOT NULL DEFAULT 0,
        outputs TEXT, error TEXT, submitted REAL, finished REAL);
    CREATE TABLE IF NOT EXISTS attempts (
        prompt_id TEXT PRIMARY KEY, job INTEGER NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL,
        reason TEXT, time REAL NOT NULL);
    """

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        # One batch command per folder: two would both submit the pending jobs (each run twice).
        self._lock_file = open(os.path.join(folder, LOCK), "a")
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock_file.close()
                raise Flux2KitError(f"Another flux2kit batch command is using {folder} (it holds {LOCK}). Let it "
                                    f"finish or stop it first; running both would submit the same jobs "
                                    f"twice.") from None
        self.path = os.path.join(folder, MANIFEST)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(self.SCHEMA)
        self.lock = threading.Lock()

    def write(self, sql: str, *args) -> None:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def many(self, statements) -> None:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        self.write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", key, json.dumps(value))

    def jobs(self) -> dict[int, dict]:
        cols = ["job", "name", "row", "fingerprint", "inputs", "state", "target", "prompt_id", "attempts", "outputs",
                "error", "submitted", "finished"]
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM jobs").fetchall()
        return {r[0]: dict(zip(cols, r)) for r in rows}

    def close(self) -> None:
        self.db.close()
        self._lock_file.close()  # releases the lock
