"""``flux2kit run --server URL``: run a workflow on a ComfyUI server and save its images here.

Upload the local images its LoadImage nodes name (and flux2kit's example images the server lacks), queue the
prompt, follow the websocket (progress, status text, errors naming the node), then fetch the saved images
through /view.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path

from ..pipelines.errors import Flux2KitError
from .comfy_client import ComfyClient, Refused, Unreachable, history_error, output_items, prompt_errors, server_error
from .terminal import say
from .workflow.graph import id_key

# The shipped workflows' example images (drawn by nodes/example_inputs.py, which ComfyUI's copy of the pack installs
# into its input folder), found by path: importing the nodes needs ComfyUI's modules, which a --server run lacks.
EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "workflows" / "example_inputs"


class ServerRunner:
    """Runs API-format workflows on a ComfyUI server and saves the output images locally."""

    def __init__(self, url: str, out_dir: str, *, log=say, timeout: float = 30.0):
        self.client = ComfyClient(url, timeout=timeout)
        self.url = self.client.url
        self.out_dir = os.path.abspath(out_dir)
        self.log, self.timeout = log, timeout
        self.cached: list[str] = []

    def _call(self, what, *args, **kwargs):
        """A client call; no answer at all becomes a message that says what to check."""
        try:
            return what(*args, **kwargs)
        except Unreachable as e:
            raise Flux2KitError(f"Cannot reach the ComfyUI server at {self.url} ({e}). Is it running "
                                "(python main.py --listen)?") from None

    def upload_image(self, path: str) -> str:
        """POST /upload/image into the input folder's flux2kit/ (never overwriting); the name LoadImage takes."""
        try:
            return self._call(self.client.upload_image, path, subfolder="flux2kit", overwrite=False)
        except Refused as e:
            raise Flux2KitError(f"The server refused the upload of {path}: HTTP {e.code} {e.body[:200]!r}") from None

    def missing_example(self, name: str) -> bool:
        """``name`` is one of flux2kit's example images and the server's input folder lacks it (its own file
        under that name, the user's or the one its flux2kit installed, is the one used)."""
        if os.path.basename(name) != name or not name.endswith(".png") or not (EXAMPLE_INPUTS / name).is_file():
            return False
        try:
            self._call(self.client.view, {"filename": name, "subfolder": "", "type": "input"})
        except Refused:
            return True
        return False

    def queue(self, workflow: dict) -> str:
        """POST /prompt; a validation failure becomes an error naming the nodes and their problems."""
        try:
            return self._call(self.client.queue_prompt, workflow)
        except Refused as e:
            raise Flux2KitError(prompt_errors(workflow, e.body, e.code)) from None

    # -- the run

    def run(self, workflow: dict) -> list[str]:
        workflow = copy.deepcopy(workflow)
        for nid, node in sorted(workflow.items(), key=lambda kv: id_key(kv[0])):
            value = node["inputs"].get("image")
            if node["class_type"] != "LoadImage" or not isinstance(value, str):
                continue
            if os.path.isfile(value):
                path = value
            elif self.missing_example(value):  # a server with an older flux2kit, or its input folder emptied
                path = str(EXAMPLE_INPUTS / value)
            else:
                continue
            node["inputs"]["image"] = self.upload_image(path)
            self.log(f"Uploaded {path} for node #{nid} as {node['inputs']['image']!r}.")
        events = None
        try:
            events = self.client.events(timeout=1.0)
        except Unreachable as e:
            self.log(f"No websocket ({e}); following the run through /history instead (no step progress).")
        try:
            prompt_id = self.queue(workflow)
            self.log(f"Queued on {self.url} as {prompt_id}.")
            try:
                self._follow(events, workflow, prompt_id)
            except KeyboardInterrupt:
                with contextlib.suppress(Flux2KitError):
                    self.client.interrupt(prompt_id)
                raise
        finally:
            if events is not None:
                events.close()
        paths = self._fetch(prompt_id)
        if paths and set(workflow) <= set(self.cached):
            self.log("Nothing changed since an earlier run on this server: these are that run's images "
                     "(change the seed or the prompt for new ones).")
        return paths

    def _follow(self, events, workflow, prompt_id) -> None:
        """Report progress until the prompt finishes; raise on an execution error."""
        last_poll = time.monotonic()
        self.cached = []
        while True:
            event = None
            if events is not None:
                try:
                    event = events.next()
                except Unreachable as e:
                    self.log(f"{str(e)[0].upper()}{str(e)[1:]}; following the run through /history.")
                    events = None
            if event is None:  # quiet: ask /history now and then, in case an event was missed
                if events is None:
                    time.sleep(0.5)
                if events is None or time.monotonic() - last_poll > 5:
                    last_poll = time.monotonic()
                    if self._finished(prompt_id):
                        return
                continue
            if event.kind == "status_text":
                if event.text:  # an empty one clears the node's text in a browser
                    self.log(f"    {event.text}")
                continue
            data = event.data
            if event.prompt_id not in (None, prompt_id):
                continue
            if event.kind == "execution_cached":
                self.cached = [str(n) for n in data.get("nodes", [])]
                if self.cached:
                    self.log(f"Cached on the server (unchanged since an earlier run): #{', #'.join(self.cached)}.")
            elif event.kind == "executing":
                node = data.get("node")
                if node is None:
                    if event.prompt_id == prompt_id:
                        return
                    continue
                ct = workflow.get(str(node), {}).get("class_type", "?")
                self.log(f"#{node} {ct}...")
            elif event.kind == "progress":
                self.log(f"    step {data.get('value')}/{data.get('max')}")
            elif event.kind == "execution_error":
                raise server_error(data)
            elif event.kind == "execution_interrupted":
                raise Flux2KitError(f"The run was interrupted on the server (at node #{data.get('node_id')}).")
            elif event.kind == "execution_success":
                return

    def _history(self, prompt_id) -> dict:
        try:
            return self._call(self.client.history, prompt_id) or {}
        except Refused:
            return {}

    def _finished(self, prompt_id) -> bool:
        entry = self._history(prompt_id)
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            for event, data in status.get("messages", []):
                if event == "execution_error":
                    raise server_error(data)
            why = history_error(entry, prompt_id) or f"the server reports that prompt {prompt_id} failed"
            raise Flux2KitError(f"{why[0].upper()}{why[1:]}.")
        return bool(entry) and status.get("completed", True)

    def _fetch(self, prompt_id) -> list[str]:
        # The websocket can report success a moment before the server stores the history entry.
        deadline = time.monotonic() + self.timeout
        entry = self._history(prompt_id)
        while not entry.get("status", {}).get("completed") and time.monotonic() < deadline:
            time.sleep(0.2)
            entry = self._history(prompt_id)
        paths = []
        for item in output_items(entry):
            try:
                data = self._call(self.client.view, item)
            except Refused as e:
                raise Flux2KitError(f"The server has no image {item.get('filename')!r} of prompt {prompt_id} "
                                    f"(HTTP {e.code}).") from None
            paths.append(write_new(os.path.join(self.out_dir, item.get("subfolder", "")), item["filename"], data))
        return paths


def write_new(folder: str, filename: str, data: bytes) -> str:
    """Write without overwriting: name.png, then name-1.png, ..."""
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(filename))
    for n in range(10000):
        path = os.path.join(folder, f"{stem}{f'-{n}' if n else ''}{ext}")
        try:
            with open(path, "xb") as f:
                f.write(data)
            return os.path.abspath(path)
        except FileExistsError:
            continue
    raise Flux2KitError(f"Too many files named {filename} in {folder}.")
