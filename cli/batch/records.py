"""A batch's records: the planned job, the states a job and a prompt attempt go through, a job's manifest row.

The manifest (``batch.sqlite``) stores the states as the enums' string values; those strings are the
ones earlier versions wrote, so a folder an earlier version left behind resumes. Never rename them.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass


@dataclass
class Job:
    """One planned job: a row of the inputs (or none) with one sweep combination, resolved into a workflow."""

    index: int  # the job number, from 1; stable for the same inputs, so a rerun finds its record
    row: int | None  # the inputs file's row, from 1; None without an inputs file
    values: dict  # the keys the row and the sweeps set, as given (the sidecar's "values")
    meta: dict  # the row's ``_`` columns, carried into the sidecars untouched
    name: str  # the stem of its images' and sidecar's file names
    workflow: dict  # API format, every value set
    images: dict[str, str]  # "NODE.INPUT" -> a local file to upload to the server that runs the job
    assigned: dict  # "NODE.INPUT" -> the value each key and --set put there (the sidecar's "set")

    def fingerprint(self) -> str:
        """What must match for a resumed batch to take a recorded job as this one: its workflow and name."""
        data = json.dumps({"workflow": self.workflow, "name": self.name}, sort_keys=True, default=str)
        return hashlib.sha256(data.encode()).hexdigest()

    def inputs(self) -> dict:
        """The inputs as the manifest records them (its ``inputs`` column)."""
        return {"values": self.values, "meta": self.meta, "set": self.assigned, "images": self.images}


class JobState(str, enum.Enum):
    """Where a job is. The values are what the manifest stores."""

    PENDING = "pending"  # waiting for a target
    SUBMITTING = "submitting"  # its prompt id recorded, POST /prompt maybe sent: look the id up before sending again
    QUEUED = "queued"  # a server has it (queued, running or finished there, not collected yet)
    RUNNING = "running"  # running in this process (no prompt id: a stopped command runs it again)
    DONE = "done"  # images and sidecars written
    FAILED = "failed"  # given up; --retry-failed makes it pending again

    @property
    def in_flight(self) -> bool:
        """Handed to a target and not finished: a resumed batch looks it up (or runs it again)."""
        return self in (JobState.SUBMITTING, JobState.QUEUED, JobState.RUNNING)

    @property
    def finished(self) -> bool:
        """Nothing more happens to it in this run."""
        return self in (JobState.DONE, JobState.FAILED)


class AttemptState(str, enum.Enum):
    """What became of one prompt id sent (or about to be sent) to a server. The values are what the manifest stores."""

    SUBMITTING = "submitting"  # recorded before POST /prompt
    QUEUED = "queued"  # the server has it
    NEVER_ARRIVED = "never arrived"  # the server never had it (a stop before the POST): sent again with a new id
    ABANDONED = "abandoned"  # its server stopped answering before it was known to have it
    LOST = "lost"  # its server had it, then no longer (restarted, unreachable, cannot give its images)
    FAILED = "failed"  # refused or failed on the server
    DONE = "done"  # its images collected


@dataclass
class JobRecord:
    """A job's row in the manifest. The dispatcher keeps one per job; the Manifest changes both together."""

    job: int
    name: str
    row: int | None
    fingerprint: str
    inputs: dict
    state: JobState
    target: str | None = None  # a server's URL or "local"
    prompt_id: str | None = None  # the latest attempt's
    attempts: int = 0  # times a target took it (a server queued it, or this process started it)
    outputs: list[str] | None = None  # image paths, once done
    error: str | None = None  # why it failed
    submitted: float | None = None  # time.time() of the latest submission
    finished: float | None = None
