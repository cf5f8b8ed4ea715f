"""Errors of the hosted-API client, and ``redact``, which keeps the API key out of every message."""

from __future__ import annotations

from ..errors import Flux2KitError

class ApiError(Flux2KitError):
    """A hosted-API job failed; the message says what happened and what to do."""

    def __init__(self, message: str, *, kind: str = "error", status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.kind, self.status, self.request_id = kind, status, request_id


class UnknownStateError(ApiError):
    """The submit may or may not have been accepted (and charged); we did not resubmit."""

    def __init__(self, message: str, **kw):
        super().__init__(message, kind="unknown", **kw)


class Cancelled(Exception):
    """The user pressed Cancel while a job was being submitted, polled or downloaded."""


def redact(text: str, secrets) -> str:
    """``text`` with every secret replaced by ``***``."""
    for s in secrets or ():
        if s:
            text = text.replace(s, "***")
    return text
