"""The batch manifest: SQLite in WAL mode in the output folder; every state change one committed transaction.

All of the batch's SQL lives here. A job's in-memory JobRecord changes only through these methods, after
the change is committed, so what the dispatcher acts on is what a resumed batch will read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable

from filelock import FileLock, Timeout

from ...pipelines.errors import Flux2KitError
from .records import AttemptState, Job, JobRecord, JobState

MANIFEST = "batch.sqlite"
LOCK = "batch.lock"

_COLUMNS = tuple(f.name for f in dataclasses.fields(JobRecord))  # the jobs table's columns, in the record's order
_CHANGEABLE = frozenset(_COLUMNS) - {"job", "name", "row", "fingerprint", "inputs"}  # fixed once recorded


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
        # One batch command per folder: two would both submit the pending jobs (each run twice). timeout=0: refuse
        # at once rather than wait. Not thread-local: the lock is the command's, whichever thread closes the manifest.
        self._folder_lock = FileLock(os.path.join(folder, LOCK), timeout=0, thread_local=False)
        try:
            self._folder_lock.acquire()
        except Timeout:
            raise Flux2KitError(f"Another flux2kit batch command is using {folder} (it holds {LOCK}). Let it "
                                f"finish or stop it first; running both would submit the same jobs "
                                f"twice.") from None
        self.path = os.path.join(folder, MANIFEST)
        self.db = None
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(self.SCHEMA)
        except BaseException:
            self.close()  # a manifest that cannot be opened must not keep the folder locked
            raise

    def close(self) -> None:
        """Close the database and free the folder for another batch command; closing again does nothing."""
        try:
            if self.db is not None:
                self.db.close()
                self.db = None
        finally:
            self._folder_lock.release()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the batch

    def batch_id(self, workflow: str) -> str:
        """This folder's batch id, made (with the workflow's file name noted) when the batch is first run."""
        if self._meta("batch_id") is None:
            self._set_meta("batch_id", uuid.uuid4().hex)
            self._set_meta("workflow", workflow)
        return self._meta("batch_id")

    def records(self) -> dict[int, JobRecord]:
        """Every recorded job, by job number."""
        with self._lock:
            rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs").fetchall()
        return {row[0]: _record(row) for row in rows}

    def add_jobs(self, jobs: list[Job]) -> None:
        """Record new jobs as pending, all in one transaction."""
        self._commit([("INSERT INTO jobs (job, name, row, fingerprint, inputs, state) VALUES (?, ?, ?, ?, ?, ?)",
                       (job.index, job.name, job.row, job.fingerprint(), json.dumps(job.inputs()),
                        JobState.PENDING.value)) for job in jobs])

    def retry_failed(self, records: Iterable[JobRecord]) -> None:
        """--retry-failed: the failed ones among ``records`` pending again, their attempts counted from 0."""
        again = [r for r in records if r.state is JobState.FAILED]
        self._commit([_update(r.job, state=JobState.PENDING, attempts=0, error=None) for r in again])
        for record in again:
            _apply(record, state=JobState.PENDING, attempts=0, error=None)

    # -- one job

    def set_state(self, record: JobRecord, state: JobState, **changes) -> None:
        """Move a job to ``state``, with other columns changed alongside (``attempts``, ``error``...)."""
        changes = dict(state=state, **changes)
        self._commit([_update(record.job, **changes)])
        _apply(record, **changes)

    def record_submission(self, record: JobRecord, prompt_id: str, target: str, at: float) -> None:
        """Before POST /prompt: the id it will send, so a stop after this leaves an id to look up, never a duplicate."""
        changes = dict(state=JobState.SUBMITTING, target=target, prompt_id=prompt_id, submitted=at)
        self._commit([
            ("INSERT OR REPLACE INTO attempts (prompt_id, job, target, state, time) VALUES (?, ?, ?, ?, ?)",
             (prompt_id, record.job, target, AttemptState.SUBMITTING.value, at)),
            _update(record.job, **changes)])
        _apply(record, **changes)

    def attempt(self, prompt_id: str, state: AttemptState, reason: str | None = None) -> None:
        """What became of the prompt ``prompt_id`` (and why, for the ones that did not finish)."""
        self._commit([("UPDATE attempts SET state = ?, reason = ?, time = ? WHERE prompt_id = ?",
                       (state.value, reason, time.time(), prompt_id))])

    # -- questions

    def stale_prompts(self, target: str) -> list[str]:
        """Prompts given up on at ``target`` (lost or abandoned) that may still sit in its queue."""
        with self._lock:
            rows = self.db.execute("SELECT prompt_id FROM attempts WHERE target = ? AND state IN (?, ?)",
                                   (target, AttemptState.LOST.value, AttemptState.ABANDONED.value)).fetchall()
        return [r[0] for r in rows]

    def done_per_target(self) -> dict[str, int]:
        """Prompts collected from each server, this run and earlier ones (in-process jobs have no prompt)."""
        with self._lock:
            rows = self.db.execute("SELECT target, COUNT(*) FROM attempts WHERE state = ? GROUP BY target",
                                   (AttemptState.DONE.value,)).fetchall()
        return dict(rows)

    # -- storage

    def _meta(self, key: str, default=None):
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def _set_meta(self, key: str, value) -> None:
        self._commit([("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))])

    def _commit(self, statements: list[tuple[str, tuple]]) -> None:
        """Run ``statements`` as one transaction, committed (synchronous=FULL: on disk) before returning."""
        if not statements:
            return
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise


def _update(job: int, **changes) -> tuple[str, tuple]:
    """The UPDATE statement for changing some of a job's columns."""
    unknown = set(changes) - _CHANGEABLE
    if unknown:  # column names are spliced into the SQL: only the record's own fields
        raise ValueError(f"not a changeable job column: {', '.join(sorted(unknown))}")
    columns = ", ".join(f"{name} = ?" for name in changes)
    return f"UPDATE jobs SET {columns} WHERE job = ?", (*(_stored(k, v) for k, v in changes.items()), job)


def _apply(record: JobRecord, **changes) -> None:
    for name, value in changes.items():
        setattr(record, name, value)


def _stored(column: str, value):
    """A record's value as the column holds it: a state as its string, the outputs as a JSON list."""
    if isinstance(value, JobState):
        return value.value
    if column == "outputs" and value is not None:
        return json.dumps(value)
    return value


def _record(row: tuple) -> JobRecord:
    values = dict(zip(_COLUMNS, row))
    values["state"] = JobState(values["state"])
    values["inputs"] = json.loads(values["inputs"])
    values["outputs"] = json.loads(values["outputs"]) if values["outputs"] else None
    return JobRecord(**values)
