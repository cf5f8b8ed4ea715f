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
