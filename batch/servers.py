"""Batch targets: a ComfyUI server over HTTP (queue, history, upload, view, websocket wake-ups), or in-process."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid

from ..headless import _WebSocket
from ..pipelines.errors import Flux2KitError

LOCAL = "local"
REQUEST_TIMEOUT = 15.0



class Unreachable(Exception):
    """The server did not answer (refused, reset, timed out)."""


class Refused(Exception):
    """The server answered with an HTTP error; ``code`` and ``body``."""

    def __init__(self, code: int, body: bytes):
        super().__init__(f"HTTP {code}: {body[:300]!r}")
        self.code, self.body = code, body


def _http(method: str, url: str, body: bytes | None = None, headers=None, timeout: float = REQUEST_TIMEOUT) -> bytes:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        raise Refused(e.code, e.read()) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise Unreachable(str(getattr(e, "reason", e))) from None


class Server:
    """A ComfyUI server: its queue, our prompts on it, uploads made to it, and a websocket for wake-ups."""

    def __init__(self, url: str, per_server: int, wake: queue.Queue, submit: bool = True):
        url = url if "://" in url else "http://" + url
        self.url = url.rstrip("/")
        self.per_server, self.submit = per_server, submit
        self.alive, self.failing_since, self.busy = True, None, 0
        self.inflight: dict[str, int] = {}  # prompt id -> job
        self.running: set[str] = set()
        self.uploads: dict[str, str] = {}  # local path -> name on the server
        self.assigned = 0
        self.client_id = uuid.uuid4().hex
        self._wake, self._stop = wake, threading.Event()
        self._thread = None

    def __repr__(self):
        return self.url

    def json(self, method: str, path: str, payload=None, timeout: float = REQUEST_TIMEOUT):
        body = json.dumps(payload).encode() if payload is not None else None
        raw = _http(method, self.url + path, body, {"Content-Type": "application/json"} if body else None, timeout)
        return json.loads(raw or b"null")

    def queue(self) -> tuple[set[str], set[str]]:
        q = self.json("GET", "/queue", timeout=5)
        ids = lambda items: {str(item[1]) for item in items or [] if len(item) > 1}  # noqa: E731
        return ids(q.get("queue_running")), ids(q.get("queue_pending"))

    def history(self, prompt_id: str) -> dict | None:
        return (self.json("GET", f"/history/{prompt_id}") or {}).get(prompt_id)

    def upload(self, path: str) -> str:
        """POST /upload/image once per file: ``flux2kit_batch/<content hash>_<name>``."""
        if path in self.uploads:
            return self.uploads[path]
        with open(path, "rb") as f:
            data = f.read()
        name = f"{hashlib.sha256(data).hexdigest()[:12]}_{os.path.basename(path)}".replace('"', "_")
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in (("type", "input"), ("subfolder", "flux2kit_batch"), ("overwrite", "true"))]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        raw = _http("POST", self.url + "/upload/image", b"".join(parts),
                    {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
        info = json.loads(raw)
        self.uploads[path] = f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]
        return self.uploads[path]

    def view(self, item: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        return _http("GET", f"{self.url}/view?{query}", timeout=120)

    # -- websocket: wakes the dispatcher when one of our prompts finishes

    def watch(self) -> None:
        self._thread = threading.Thread(target=self._listen, daemon=True, name=f"ws {self.url}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        while not self._stop.is_set():
            try:
                ws = _WebSocket(url, timeout=0.5)
            except (OSError, Flux2KitError):
                self._stop.wait(1.0)
                continue
            try:
                while not self._stop.is_set():
                    try:
                        message = ws.recv()
                    except socket.timeout:
                        continue
                    if isinstance(message, bytes):
                        continue
                    event = json.loads(message)
                    kind, data = event.get("type"), event.get("data") or {}
                    if kind in ("execution_success", "execution_error", "execution_interrupted") or (
                            kind == "executing" and data.get("node") is None and data.get("prompt_id")):
                        self._wake.put(self.url)
            except (OSError, ValueError, Flux2KitError):
                pass
            finally:
                ws.close()


class Local:
    """In-process target: one job at a time on a worker thread, with headless.LocalRunner."""

    url = LOCAL

    def __init__(self, runner, wake: queue.Queue):
        self.runner, self._wake = runner, wake
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.current: int | None = None
        self.assigned = 0
        threading.Thread(target=self._work, daemon=True, name="flux2kit local").start()

    def _work(self) -> None:
        while True:
            job, workflow = self.jobs.get()
            if job is None:
                return
            try:
                result = ("done", self.runner.run(workflow))
            except Flux2KitError as e:
                result = ("failed", str(e))
            except Exception as e:  # noqa: BLE001 - reported as the job's failure, the batch goes on
                result = ("failed", f"{type(e).__name__}: {e}")
            self.results.put((job, *result))
            self._wake.put(LOCAL)

    def stop(self) -> None:
        self.jobs.put((None, None))
