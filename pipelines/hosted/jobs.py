"""Jobs on hosted FLUX.2 APIs: submit once, poll with backoff, download at once.

Standard library only; no ComfyUI. The HTTP transport is transport.py, the errors errors.py, and the
provider-specific request and response shapes providers.py; this module knows only the life of a job:

1. submit: POST the request. It is resubmitted only when the provider provably did not accept it
   (an answer of 429 or 503, or a connection that was never made). After an ambiguous failure
   (the connection dropped after the request was sent, an unreadable answer) nobody knows whether
   the job runs and is charged, so we report that state instead of paying twice.
2. poll: follow the polling URL with backoff and jitter until a final status or the deadline;
   429, 5xx and dropped connections while polling are retried (polling is free and idempotent).
3. download: fetch the result at once (hosted result URLs expire within minutes).

The API key goes only into the provider's auth header, and only to hosts the caller trusts; it
never appears in messages, logs or return values (``redact`` removes it from any text we pass on).
"""

from __future__ import annotations

import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import ApiError, Cancelled, UnknownStateError, redact
from .transport import NoAnswer, NotSent, Response, Transport, host_of

# -- policy ----------------------------------------------------------------------------------------

@dataclass
class RetryPolicy:
    """Waits and limits. Defaults suit the hosted APIs; tests pass tiny ones."""

    first_poll_delay: float = 1.0  # seconds before the first poll
    poll_interval: float = 1.0  # first wait between polls; grows by ``factor`` up to ``max_poll_interval``
    max_poll_interval: float = 5.0
    factor: float = 1.5
    jitter: float = 0.25  # +- this fraction of each wait, so a batch's polls spread out
    retry_delay: float = 2.0  # first wait after a 429/5xx/dropped connection; doubles up to ``max_retry_delay``
    max_retry_delay: float = 30.0
    submit_attempts: int = 5  # submits of one job when the provider provably did not accept it
    download_attempts: int = 4
    deadline: float = 600.0  # seconds for the whole batch, from the first submit
    connect_timeout: float = 15.0
    read_timeout: float = 120.0  # per request; the sync endpoints answer only when the image is ready
    cancel_check: float = 0.05  # how often a wait checks for Cancel

    def wait_for(self, base: float) -> float:
        return max(0.0, base * (1.0 + random.uniform(-self.jitter, self.jitter)))


# -- jobs ------------------------------------------------------------------------------------------

@dataclass
class Submitted:
    """What a provider said when it accepted a job."""

    request_id: str | None
    poll_url: str | None = None  # None when the answer already holds the result (sync endpoints)
    cost_usd: float | None = None  # as reported by the provider
    result: "PollState | None" = None


@dataclass
class PollState:
    """One poll answer, normalised: state is pending, ready or failed."""

    state: str
    status: str = ""  # the provider's own word, for messages
    message: str = ""
    result_url: str | None = None
    image_bytes: bytes | None = None
    progress: float | None = None  # 0..1 when the provider reports it


@dataclass
class JobResult:
    index: int
    seed: int
    request_id: str | None
    image_bytes: bytes
    cost_usd: float | None
    status_log: list[str] = field(default_factory=list)


class Clock:
    """Monotonic seconds and waiting, for the deadline and the backoff (tests pass a clock they move)."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Deadline:
    def __init__(self, seconds: float, clock: Clock):
        self.seconds, self.clock = seconds, clock
        self.end = clock.now() + seconds

    def left(self) -> float:
        return self.end - self.clock.now()


def utc(timestamp: float | None) -> str:
    """A wall-clock time as the providers' usage logs show it ("2026-11-30 14:05:09 UTC")."""
    if timestamp is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


class JobRunner:
    """Runs a batch of provider jobs: at most ``limit`` at once, one deadline for all.

    ``provider`` supplies the request/response mapping (see providers.Provider); ``should_cancel``
    is polled during every wait and every request; ``on_status(index, status, progress)`` reports progress;
    ``clock`` measures the deadline and the waits (a :class:`Clock`).
    """

    def __init__(self, provider, key: str, *, policy: RetryPolicy | None = None, limit: int = 4,
                 should_cancel=None, on_status=None, transport: Transport | None = None, log=None,
                 clock: Clock | None = None):
        if not isinstance(key, str) or not key or any(not (33 <= ord(c) <= 126) for c in key):
            # http.client would quote such a key in its "Invalid header value" error
            raise ApiError(f"The {getattr(provider, 'name', 'provider')} API key is empty or contains spaces, line "
                           f"breaks or non-ASCII characters. Copy it again from the provider's dashboard.", kind="auth")
        self.provider, self._key = provider, key
        self.policy = policy or RetryPolicy()
        self.limit = max(1, int(limit))
        self.should_cancel = should_cancel or (lambda: False)
        self.on_status = on_status or (lambda index, status, progress: None)
        self.transport = transport or Transport(self.policy)
        self.log = log or (lambda message: None)
        self.clock = clock or Clock()
        self._cancelled = threading.Event()
        self._deadline = _Deadline(self.policy.deadline, self.clock)
        self.accepted: dict[int, str | None] = {}  # job index -> request id, for every job a provider accepted
        self.delivered: set[int] = set()  # job indices whose image arrived
        # job index -> (host, wall-clock time) of a submit that was sent and got no answer before Cancel
        self.unanswered: dict[int, tuple[str, float | None]] = {}

    # -- helpers

    def _redact(self, text: str) -> str:
        return redact(text, [self._key])

    def _check_cancel(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled()
        if self.should_cancel():
            self._cancelled.set()
            raise Cancelled()

    def _should_abort(self) -> str | None:
        """For the transport, while a request is under way: why to stop it (Cancel pressed, the deadline passed)."""
        if self._cancelled.is_set():
            return "Cancel"
        if self.should_cancel():
            self._cancelled.set()
            return "Cancel"
        if self._deadline.left() <= 0:
            return "the deadline"
        return None

    def _sleep(self, seconds: float) -> None:
        clock = self.clock
        end = clock.now() + min(seconds, max(0.0, self._deadline.left()))  # a backoff never outlasts the deadline
        while True:
            self._check_cancel()
            left = end - clock.now()
            if left <= 0:
                return
            clock.sleep(min(left, self.policy.cancel_check))

    def _headers_for(self, url: str) -> dict:
        """The auth header, only for hosts the provider trusts with the key."""
        return self.provider.auth_headers(self._key) if self.provider.trusts(url) else {}

    def _retry_after(self, resp: Response, fallback: float) -> float:
        """The server's Retry-After (capped), but never less than our own backoff: "0" must not make a tight loop."""
        try:
            asked = float(resp.headers.get("retry-after", ""))
        except ValueError:
            return fallback
        if asked != asked:  # NaN
            return fallback
        return max(fallback, min(asked, self.policy.max_retry_delay))

    # -- one job

    def run(self, jobs: list, *, allow_partial: bool = False) -> list[JobResult]:
        """Submit, poll and download every job; results in job order. Raises the first failure (by index).

        ``allow_partial``: when some images finished (and were paid for) and others failed, return the
        finished ones and leave the failures in ``self.failures`` ({job index: ApiError}) instead.
        """
        results: list[JobResult | None] = [None] * len(jobs)
        errors: dict[int, BaseException] = {}
        self.failures: dict[int, ApiError] = {}
        self.accepted, self.delivered, self.unanswered = {}, set(), {}
        self._deadline = _Deadline(self.policy.deadline, self.clock)  # the node's timeout: the whole batch
        stop_submitting = threading.Event()

        def work(i, job):
            if stop_submitting.is_set():
                return
            try:
                results[i] = self._run_one(i, job)
            except BaseException as e:  # noqa: BLE001 - collected and re-raised below
                errors[i] = e
                if not isinstance(e, ApiError) or e.kind in ("auth", "credits", "config", "unknown", "cancelled"):
                    stop_submitting.set()  # the others would fail the same way (or be paid for nothing)
                if isinstance(e, Cancelled):
                    self._cancelled.set()

        with ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="flux2kit-api") as pool:
            for future in [pool.submit(work, i, job) for i, job in enumerate(jobs)]:
                future.result()
        if any(isinstance(e, Cancelled) for e in errors.values()) or self._cancelled.is_set():
            raise Cancelled(self.unfinished_note())
        done = [r for r in results if r is not None]
        if errors and allow_partial and done and all(isinstance(e, ApiError) for e in errors.values()):
            self.failures = {i: type(e)(self._redact(str(e)), **_error_fields(e)) for i, e in sorted(errors.items())}
            return done
        if errors:
            first = min(errors)
            err = errors[first]
            done = [r for r in results if r is not None]
            if isinstance(err, ApiError):
                note = str(err)
                if len(jobs) > 1:
                    note = f"Image {first + 1} of {len(jobs)} (seed {jobs[first].seed}): {note}"
                    if done:
                        ids = ", ".join(r.request_id or "?" for r in done)
                        note += f" ({len(done)} other image(s) finished and were charged: request id(s) {ids}.)"
                    others = [e.request_id for i, e in sorted(errors.items())
                              if i != first and isinstance(e, ApiError) and e.request_id]
                    if others:  # accepted, then failed or timed out: some may still finish and be charged
                        note += f" (Other accepted job(s) that did not deliver: request id(s) {', '.join(others)}.)"
                if note != str(err) or self._redact(note) != note:  # provider texts are quoted: never the key
                    raise type(err)(self._redact(note), **_error_fields(err)) from None
            raise err
        return results  # type: ignore[return-value]

    def unfinished_note(self) -> str:
        """What may still be charged after Cancel: the request ids of accepted jobs that delivered no image, and the
        submits that were sent and got no answer (no request id: only the host and the time are known)."""
        notes = []
        ids = [rid or "?" for i, rid in sorted(self.accepted.items()) if i not in self.delivered]
        if ids:
            notes.append(f"{len(ids)} accepted job(s) may still finish and be charged: request id(s) {', '.join(ids)}.")
        if self.unanswered:
            hosts = ", ".join(sorted({host for host, _ in self.unanswered.values()}))
            times = ", ".join(sorted({utc(t) for _, t in self.unanswered.values()}))
            notes.append(f"{len(self.unanswered)} job(s) were sent to {hosts} at {times} with no answer yet (no request "
                         f"id): they may have been accepted and may be charged.")
        return " ".join(notes)

    def _run_one(self, index: int, job) -> JobResult:
        log: list[str] = []

        def status(text, progress=None):
            log.append(text)
            self.on_status(index, text, progress)

        status("submitting")
        sub = self._submit(index, job)
        self.accepted[index] = sub.request_id
        status("accepted" + (f" (request id {sub.request_id})" if sub.request_id else ""), 0.1)
        state = sub.result
        if state is None:
            state = self._poll(sub, status)
        image = state.image_bytes
        if image is None:
            status("downloading", 0.95)
            image = self._download(state.result_url, sub.request_id)
        self.delivered.add(index)
        status("done", 1.0)
        return JobResult(index=index, seed=job.seed, request_id=sub.request_id, image_bytes=image,
                         cost_usd=sub.cost_usd, status_log=log)

    def _submit(self, index: int, job) -> Submitted:
        method, url, body = self.provider.submit_request(job)
        name, host = self.provider.name, host_of(url)
        delay = self.policy.retry_delay
        last = ""
        for attempt in range(1, self.policy.submit_attempts + 1):
            self._check_cancel()
            if self._deadline.left() <= 0:
                break
            try:
                # Cancel and the deadline cut the submit in every phase, even though a queue submit usually answers
                # within seconds: a server that never answers must not hold the node (what was sent is reported)
                resp = self.transport.request(method, url, self._headers_for(url), body, abort=self._should_abort)
            except NotSent as e:
                if e.stopped:  # Cancel or the deadline while connecting: nothing went out
                    self._check_cancel()
                    last = f"stopped while connecting to {host}"
                    continue
                last = f"could not connect to {host} ({e})"
                self.log(f"{name}: {last}; retrying")
                self._sleep(self.policy.wait_for(delay))
                delay = min(delay * 2, self.policy.max_retry_delay)
                continue
            except NoAnswer as e:
                raise self._no_answer(index, host, e) from None
            if resp.status in (429, 503):
                last = f"{name} answered {resp.status} ({'too many requests' if resp.status == 429 else 'busy'})"
                self.log(f"{last}; retrying")
                self._sleep(self.policy.wait_for(self._retry_after(resp, delay)))
                delay = min(delay * 2, self.policy.max_retry_delay)
                continue
            if resp.status >= 500:
                raise UnknownStateError(self._redact(
                    f"{name} answered {resp.status} to the submit ({resp.text()}). It is not certain the job was "
                    f"refused, so it was NOT sent again. {self.provider.where_to_check()}"), status=resp.status)
            if resp.status >= 400:
                raise self._http_error(resp, "submit")
            try:
                data = resp.json()
                sub = self.provider.parse_submit(data, job)
            except ApiError:
                raise
            except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                raise UnknownStateError(self._redact(
                    f"{name} answered the submit with something unreadable ({resp.text(200)!r}). The job may have "
                    f"been accepted and charged, so it was NOT sent again. {self.provider.where_to_check()}")) from None
            return sub
        if self._deadline.left() <= 0:
            raise ApiError(f"{name}: the deadline of {self.policy.deadline:g} s passed before the job could be "
                           f"submitted ({last or 'no attempt'}). Nothing was charged. Raise the timeout or try later.",
                           kind="deadline")
        raise ApiError(self._redact(f"{name}: the job was not accepted after {self.policy.submit_attempts} attempts "
                                    f"({last}). Nothing was charged. {self.provider.busy_hint()}"), kind="busy")

    def _no_answer(self, index: int, host: str, e: NoAnswer) -> BaseException:
        """A submit that was sent and got no (complete) answer: the job may run and be charged; never sent again."""
        name, where = self.provider.name, self.provider.where_to_check()
        sent = f"the request was sent to {host} at {utc(e.sent_at)} and no request id came back"
        if e.stopped == "Cancel" or self._cancelled.is_set():
            self._cancelled.set()
            self.unanswered[index] = (host, e.sent_at)  # the Cancel note names it (unfinished_note)
            return Cancelled()
        if e.stopped:
            return UnknownStateError(self._redact(
                f"{name}: no answer to the submit before the deadline of {self.policy.deadline:g} s (the node's "
                f"timeout): {sent}. The job may have been accepted and charged, so it was NOT sent again. {where} "
                f"Raise the timeout if the provider is slow to answer."))
        return UnknownStateError(self._redact(
            f"{name}: the connection to {host} dropped after the request was sent ({e}): {sent}. The job may have "
            f"been accepted and charged, so it was NOT sent again. {where}"))

    def _poll(self, sub: Submitted, status) -> PollState:
        name = self.provider.name
        rid = sub.request_id
        self._sleep(self.policy.wait_for(self.policy.first_poll_delay))
        interval, retry = self.policy.poll_interval, self.policy.retry_delay
        last_status = "submitted"
        while True:
            self._check_cancel()
            if self._deadline.left() <= 0:
                raise ApiError(
                    f"{name}: request {rid} was still '{last_status}' when the deadline of {self.policy.deadline:g} s "
                    f"passed, so polling stopped. The job may still finish and be charged. "
                    f"{self.provider.where_to_check(rid)} Raise the timeout for long jobs.", kind="deadline",
                    request_id=rid)
            try:
                resp = self.transport.request("GET", sub.poll_url, self._headers_for(sub.poll_url), abort=self._should_abort)
            except (NotSent, NoAnswer) as e:
                self.log(f"{name}: polling {rid}: {e}; retrying")
                self._sleep(self.policy.wait_for(retry))
                retry = min(retry * 2, self.policy.max_retry_delay)
                continue
            if resp.status == 429 or resp.status >= 500:
                self.log(f"{name}: polling {rid}: HTTP {resp.status}; retrying")
                self._sleep(self.policy.wait_for(self._retry_after(resp, retry)))
                retry = min(retry * 2, self.policy.max_retry_delay)
                continue
            if resp.status == 404:
                raise ApiError(f"{name}: request {rid}: Task not found (the polling URL answered 404). The task "
                               f"expired or belongs to another region or key. {self.provider.where_to_check(rid)}",
                               kind="not_found", status=404, request_id=rid)
            if resp.status >= 400:
                raise self._http_error(resp, "poll", rid)
            try:
                state = self.provider.parse_poll(resp.json())
            except (ValueError, KeyError, TypeError, AttributeError):
                self.log(f"{name}: polling {rid}: unreadable answer; retrying")
                self._sleep(self.policy.wait_for(retry))
                retry = min(retry * 2, self.policy.max_retry_delay)
                continue
            retry = self.policy.retry_delay
            if state.status and state.status != last_status:
                last_status = state.status
                status(state.status, 0.1 + 0.8 * state.progress if state.progress is not None else None)
            if state.state == "ready":
                return state
            if state.state == "failed":
                raise self.provider.failure(state, rid)
            self._sleep(self.policy.wait_for(interval))
            interval = min(interval * self.policy.factor, self.policy.max_poll_interval)

    def _download(self, url: str | None, rid: str | None) -> bytes:
        name = self.provider.name
        if not url:
            raise ApiError(f"{name}: request {rid} is ready but its answer has no result URL. "
                           f"{self.provider.where_to_check(rid)}", request_id=rid)
        delay = self.policy.retry_delay
        last = ""
        for _ in range(self.policy.download_attempts):
            self._check_cancel()
            if self._deadline.left() <= 0:
                raise ApiError(f"{name}: request {rid} finished (and is charged) but its result could not be downloaded "
                               f"from {host_of(url)} before the deadline of {self.policy.deadline:g} s ({last or 'slow'}). "
                               f"{self.provider.where_to_check(rid)} Raise the timeout for slow connections.",
                               kind="deadline", request_id=rid)
            try:
                auth = self._headers_for(url) if self.provider.download_needs_key else {}
                resp = self.transport.request("GET", url, auth | {"Accept": "image/*"}, abort=self._should_abort)
            except (NotSent, NoAnswer) as e:
                last = str(e)
            else:
                if resp.status == 200 and resp.body:
                    return resp.body
                if resp.status in (403, 404, 410):
                    raise ApiError(f"{name}: the result of request {rid} is gone (HTTP {resp.status} from "
                                   f"{host_of(url)}): result URLs expire minutes after the job finishes. It was fetched "
                                   f"at once, so it probably expired on the provider's side; run the job again "
                                   f"(it is charged again).", kind="expired", status=resp.status, request_id=rid)
                if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("location"):
                    url = urllib.parse.urljoin(url, resp.headers["location"])
                    continue
                last = f"HTTP {resp.status}"
            self._sleep(self.policy.wait_for(delay))
            delay = min(delay * 2, self.policy.max_retry_delay)
        raise ApiError(f"{name}: could not download the result of request {rid} from {host_of(url)} ({last}). "
                       f"Check the network and {self.provider.where_to_check(rid)}", kind="download", request_id=rid)

    def _http_error(self, resp: Response, stage: str, rid: str | None = None) -> ApiError:
        return self.provider.http_error(resp.status, self._redact(resp.text()), stage, rid)


def _error_fields(err: ApiError) -> dict:
    fields = {"status": err.status, "request_id": err.request_id}
    if type(err) is ApiError:
        fields["kind"] = err.kind
    return fields
