"""A local stand-in for the hosted FLUX.2 APIs (Black Forest Labs and Oxen.ai) on 127.0.0.1.

It speaks both protocols closely enough for the client (submit, poll, download; Oxen sync and queue),
follows a scriptable scenario, and records every request (method, path, headers, body) so tests can
count submissions and check where the API key went.

Scenario (``server.scenario``, a dict; missing keys mean "behave well"):
- ``submit``: list of answers to successive submits: "ok", an HTTP status (429, 503, 402, 403, 422,
  500), "malformed" (200 with broken JSON), "reset" (read the request, then drop the connection) or
  "black_hole" (read the request, then never answer: the connection stays open until ``reset`` or the
  end). The last entry repeats.
- ``poll``: list of statuses each job goes through (BFL words, e.g. ["Pending", "Ready"]), or
  "never" (always Pending). The last entry repeats. Entries may also be HTTP statuses (503) or
  "malformed" for a transient failure on that poll.
- ``poll_by_seed``: {seed: [statuses]} - a different sequence for the job with that seed.
- ``result``: "ok", "slow" (a byte every 0.1 s) or an HTTP status for the result download (404 = expired).
- ``hold_until_active``: n - the first poll of each job waits (up to 5 s) until n jobs are active,
  so a test can see whether jobs really overlap; ``jobs``: the batch size (the last ones do not wait).

Also here: ``ManualClock`` (a clock a test moves, for the client's deadline) and ``silent_listener``
(a port whose connections are never completed: the client hangs while connecting).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

BFL_KEY_HEADER = "x-key"


def image_bytes(seed: int, size=(32, 24), fmt="PNG") -> bytes:
    """A small solid image whose colour encodes the seed, so tests can check the order of a batch."""
    color = (seed % 251, (seed * 7) % 251, (seed * 13) % 251)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def seed_of_color(rgb) -> int:
    return int(rgb[0])


class ApiServer:
    def __init__(self, key: str = "test-key-0123456789abcdef"):
        self.key = key
        self.scenario: dict = {}
        self.requests: list[dict] = []
        self.jobs: dict[str, dict] = {}
        self.lock = threading.Condition()
        self.active = 0
        self.max_active = 0
        self._submits = 0
        self.release = threading.Event()  # ends the "black_hole" answers
        handler = type("Handler", (_Handler,), {"api": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="api-test-server", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what tests read

    def submissions(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]

    def key_leaks(self, key: str, auth_header: str = BFL_KEY_HEADER) -> list[str]:
        """Where requests carried ``key`` other than in ``auth_header`` (or Authorization): should be nowhere."""
        leaks = []
        for r in self.requests:
            where = ["path"] if key in r["path"] else []
            where += ["body"] if key.encode() in r["body"] else []
            where += [f"header {k}" for k, v in r["headers"].items()
                      if k.lower() not in (auth_header, "authorization") and key in v]
            leaks += [f"{r['method']} {r['path'].split('?')[0]}: {w}" for w in where]
        return leaks

    def wait_for_requests(self, count: int = 1, timeout: float = 30.0) -> bool:
        """True once ``count`` requests have arrived (False after ``timeout`` seconds, so a broken test ends)."""
        with self.lock:
            return self.lock.wait_for(lambda: len(self.requests) >= count, timeout=timeout)

    def reset(self, scenario: dict | None = None) -> None:
        self.release.set()  # the connections a "black_hole" scenario held open are closed
        with self.lock:
            self.release = threading.Event()
            self.scenario = scenario or {}
            self.requests.clear()
            self.jobs.clear()
            self.active = self.max_active = self._submits = 0

    # -- behaviour

    def _next(self, name: str, i: int, default):
        seq = self.scenario.get(name, [default])
        if isinstance(seq, (str, int)):
            seq = [seq]
        return seq[min(i, len(seq) - 1)]


class _Handler(BaseHTTPRequestHandler):
    api: ApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _record(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.api.lock:
            self.api.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                                      "body": body})
            self.api.lock.notify_all()
        return body

    def _send(self, status: int, payload=None, raw: bytes | None = None, ctype="application/json"):
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if status in (429, 503):
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def _trickle(self, data: bytes, pause: float = 0.1):
        """A result that arrives a byte at a time: every read succeeds, the whole answer takes long."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                threading.Event().wait(pause)
        except OSError:  # the client gave up
            self.close_connection = True

    def _reset_connection(self):
        # RST instead of FIN: the client sees "connection reset" after it sent the request
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _authorized(self, provider: str) -> bool:
        if provider == "bfl":
            return self.headers.get(BFL_KEY_HEADER) == self.api.key
        return self.headers.get("Authorization") == f"Bearer {self.api.key}"

    # -- routes

    def do_POST(self):
        body = self._record()
        path = urllib.parse.urlsplit(self.path).path
        provider = "bfl" if path.startswith("/v1/") else "oxen"
        with self.api.lock:
            n = self.api._submits
            self.api._submits += 1
        answer = self.api._next("submit", n, "ok")
        if answer == "reset":
            return self._reset_connection()
        if answer == "black_hole":  # the request arrived; the answer never comes
            self.api.release.wait()
            self.close_connection = True
            return None
        if not self._authorized(provider):
            return self._send(403, {"detail": "Not authenticated - invalid key"})
        if answer == "malformed":
            return self._send(200, raw=b'{"id": "abc", "polling_url": ')
        if isinstance(answer, int):
            details = {402: "Insufficient credits", 422: {"detail": [{"loc": ["body", "width"], "msg": "too large"}]},
                       429: "Too many active tasks", 503: "Service busy"}.get(answer, "error")
            return self._send(answer, {"detail": details})
        request = json.loads(body or b"{}")
        job_id = uuid.uuid4().hex
        seed = int(request.get("seed", 0))
        with self.api.lock:
            self.api.jobs[job_id] = {"polls": 0, "seed": seed, "request": request, "provider": provider}
            self.api.active += 1
            self.api.max_active = max(self.api.max_active, self.api.active)
            self.api.lock.notify_all()
        if provider == "bfl":
            return self._send(200, {"id": job_id, "polling_url": f"{self.api.url}/v1/get_result?id={job_id}",
                                    "cost": 4.5, "input_mp": 0.0, "output_mp": 1.0})
        if path.endswith("/queue"):
            return self._send(200, {"generations": [{"generation_id": job_id, "status": "queued"}]})
        # Oxen sync: the image comes with the answer
        self._finish(job_id)
        return self._send(200, {"images": [{"b64_json": base64.b64encode(image_bytes(seed)).decode()}]})

    def _finish(self, job_id):
        with self.api.lock:
            job = self.api.jobs.get(job_id)
            if job and not job.get("finished"):
                job["finished"] = True
                self.api.active -= 1

    def do_GET(self):
        self._record()
        parts = urllib.parse.urlsplit(self.path)
        if parts.path.startswith("/results/"):
            job_id = parts.path.rsplit("/", 1)[1].split(".")[0]
            answer = self.api.scenario.get("result", "ok")
            job = self.api.jobs.get(job_id)
            self._finish(job_id)
            if answer == "slow" and job is not None:
                return self._trickle(image_bytes(job["seed"]))
            if answer != "ok" or job is None:
                return self._send(answer if isinstance(answer, int) else 404, {"detail": "Not found"})
            return self._send(200, raw=image_bytes(job["seed"]), ctype="image/png")
        if parts.path == "/v1/get_result":
            provider, job_id = "bfl", urllib.parse.parse_qs(parts.query).get("id", [""])[0]
        elif parts.path.startswith("/api/ai/queue/"):
            provider, job_id = "oxen", parts.path.rsplit("/", 1)[1]
        else:
            return self._send(404, {"detail": "no such route"})
        if not self._authorized(provider):
            return self._send(403, {"detail": "Not authenticated"})
        job = self.api.jobs.get(job_id)
        if job is None:
            return self._send(200, {"id": job_id, "status": "Task not found"} if provider == "bfl" else {})
        hold = self.api.scenario.get("hold_until_active")
        if hold and job["polls"] == 0:
            with self.api.lock:
                total = self.api.scenario.get("jobs", float("inf"))  # once all are in, no more can overlap
                self.api.lock.wait_for(lambda: self.api.active >= hold or len(self.api.jobs) >= total, timeout=5.0)
        seq = self.api.scenario.get("poll_by_seed", {}).get(job["seed"]) or self.api.scenario.get("poll", ["Pending", "Ready"])
        if seq == "never":
            seq = ["Pending"]
        status = seq[min(job["polls"], len(seq) - 1)]
        job["polls"] += 1
        if status == "malformed":
            return self._send(200, raw=b"{not json")
        if isinstance(status, int):
            return self._send(status, {"detail": "transient"})
        result_url = f"{self.api.url}/results/{job_id}.png"
        if status in ("Error", "Request Moderated", "Content Moderated", "Task not found"):
            self._finish(job_id)
        if provider == "bfl":
            payload = {"id": job_id, "status": status, "result": None, "progress": None}
            if status == "Ready":
                payload["result"] = {"sample": result_url, "seed": job["seed"]}
            elif status in ("Error", "Request Moderated", "Content Moderated"):
                payload["details"] = {"moderation_reasons": ["test"]} if "Moderated" in status else "internal error"
            return self._send(200, payload)
        oxen_status = {"Pending": "queued", "Generating": "processing", "Ready": "succeeded", "Error": "failed",
                       "Content Moderated": "failed", "Request Moderated": "failed"}.get(status, status)
        payload = {"generation_id": job_id, "status": oxen_status}
        if oxen_status == "succeeded":
            payload["result_url"] = result_url
        elif oxen_status == "failed":
            payload["error_message"] = "NSFW content detected by the safety checker" if "Moderated" in status else "internal error"
        return self._send(200, payload)


class ManualClock:
    """The client's clock (jobs.Clock) moved by the test: ``advance`` jumps past a deadline at a chosen moment.

    ``sleep`` advances the clock by the time asked (backoff waits pass at once) and yields briefly in real
    time, so other threads run.
    """

    def __init__(self, start: float = 1000.0):
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        threading.Event().wait(0.001)


@contextlib.contextmanager
def silent_listener():
    """The URL of a port that listens but never completes a connection: a client hangs in connect().

    A listen backlog of 0 holds one pending connection; this fills it, so the kernel ignores further
    connection attempts (the client's connect waits for its own timeout).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        filler.close()
        listener.close()
