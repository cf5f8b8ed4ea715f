"""Batch targets: a ComfyUI server (through the one client: queue, history, upload, view, websocket wake-ups), or
this process (one job at a time on a worker thread)."""

from __future__ import annotations

import hashlib
import os
import queue
import threading

from ...pipelines.errors import Flux2KitError
from ..comfy_client import ComfyClient, Unreachable

LOCAL = "local"


class Server:
    """A ComfyUI server as a batch target: the client, our prompts on it, uploads made to it, its capacity."""

    def __init__(self, url: str, per_server: int, wake: queue.Queue, submit: bool = True):
        self.client = ComfyClient(url)
        self.url = self.client.url
        self.per_server, self.submit = per_server, submit
        self.alive, self.failing_since, self.busy = True, None, 0
        self.inflight: dict[str, int] = {}  # prompt id -> job
        self.running: set[str] = set()
        self.uploads: dict[str, str] = {}  # local path -> name on the server
        self.assigned = 0
        self._wake, self._stop = wake, threading.Event()
        self._thread = None

    def __repr__(self):
        return self.url

    def upload(self, path: str) -> str:
        """Upload a reference once per server as ``flux2kit_batch/<content hash>_<name>`` (the same file, one name)."""
        if path in self.uploads:
            return self.uploads[path]
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        name = f"{digest}_{os.path.basename(path)}"
        self.uploads[path] = self.client.upload_image(path, subfolder="flux2kit_batch", name=name, overwrite=True)
        return self.uploads[path]

    # -- websocket: wakes the dispatcher when one of our prompts finishes

    def watch(self) -> None:
        self._thread = threading.Thread(target=self._listen, daemon=True, name=f"ws {self.url}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                events = self.client.events(timeout=0.5)
            except Unreachable:
                self._stop.wait(1.0)
                continue
            try:
                while not self._stop.is_set():
                    event = events.next()
                    if event is None:
                        continue
                    if event.kind in ("execution_success", "execution_error", "execution_interrupted") or (
                            event.kind == "executing" and event.data.get("node") is None and event.prompt_id):
                        self._wake.put(self.url)
            except Unreachable:
                pass
            finally:
                events.close()


class Local:
    """In-process target: one job at a time on a worker thread, with local_runner.LocalRunner."""

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
