"""The one client of ComfyUI's server API, used by ``flux2kit run --server`` and ``flux2kit batch``.

HTTP through ``requests`` and the event stream through ``websocket-client`` (the pair ComfyUI's own
websocket API example uses): ``POST /prompt``, ``GET /queue``, ``/history``, ``/view``,
``/object_info``, ``POST /upload/image``, ``/interrupt`` and ``/ws``.

Failures come in two kinds, because callers treat them differently: :class:`Unreachable` (no answer:
refused, reset, timed out; a batch moves the job elsewhere) and :class:`Refused` (an HTTP error
answer, with its code and body; e.g. ComfyUI's 400 with ``node_errors`` for an invalid prompt).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from dataclasses import dataclass, field

import requests
import websocket

from ..pipelines.errors import Flux2KitError
from .workflow.graph import NodeError, id_key

REQUEST_TIMEOUT = 15.0
STATUS_TEXT = 3  # binary event: a node's status text (1 and 4 are preview images)


class Unreachable(Flux2KitError):
    """The server did not answer (refused, reset, timed out)."""


class Refused(Flux2KitError):
    """The server answered with an HTTP error; ``code`` and ``body``."""

    def __init__(self, code: int, body: bytes):
        super().__init__(f"HTTP {code}: {body[:300]!r}")
        self.code, self.body = code, body


@dataclass
class Event:
    """One message of the websocket: ``kind`` ("executing", "progress", ..., or "status_text"), ``data``."""

    kind: str
    data: dict = field(default_factory=dict)
    text: str = ""  # status text (binary STATUS_TEXT events)

    @property
    def prompt_id(self) -> str | None:
        return self.data.get("prompt_id")


class Events:
    """A connected websocket: ``next()`` returns the next event, or None when none came within the timeout."""

    def __init__(self, ws: websocket.WebSocket):
        self.ws = ws

    def next(self) -> Event | None:
        try:
            message = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketException, OSError) as e:
            raise Unreachable(f"the websocket closed ({e or type(e).__name__})") from None
        if isinstance(message, bytes):
            if len(message) > 8 and struct.unpack(">I", message[:4])[0] == STATUS_TEXT:
                n = struct.unpack(">I", message[4:8])[0]
                return Event("status_text", text=message[8 + n:].decode("utf-8", "replace"))
            return Event("binary")
        try:
            event = json.loads(message)
        except ValueError:
            return Event("unreadable")
        return Event(str(event.get("type")), event.get("data") or {})

    def close(self) -> None:
        try:
            self.ws.close()
        except (websocket.WebSocketException, OSError):
            pass


class ComfyClient:
    """One ComfyUI server at ``url`` (http://host:port); ``client_id`` routes its websocket events to us."""

    def __init__(self, url: str, *, timeout: float = REQUEST_TIMEOUT, client_id: str | None = None):
        url = url if "://" in url else "http://" + url
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.session = requests.Session()
        self.session.trust_env = False  # a local server: no proxies from the environment

    def __repr__(self) -> str:
        return self.url

    # -- HTTP

    def request(self, method: str, path: str, *, json_body=None, files=None, data=None,
                timeout: float | None = None) -> bytes:
        """The answer's body; :class:`Refused` for an HTTP error, :class:`Unreachable` for no answer."""
        try:
            resp = self.session.request(method, self.url + path, json=json_body, files=files, data=data,
                                        timeout=timeout or self.timeout)
        except requests.RequestException as e:
            raise Unreachable(f"{self.url}: {_reason(e)}") from None
        if resp.status_code >= 400:
            raise Refused(resp.status_code, resp.content)
        return resp.content

    def json(self, method: str, path: str, payload=None, *, timeout: float | None = None):
        raw = self.request(method, path, json_body=payload, timeout=timeout)
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise Refused(200, raw[:300]) from None

    def object_info(self) -> dict:
        return self.json("GET", "/object_info", timeout=60)

    def upload_image(self, path: str, *, subfolder: str, name: str | None = None, overwrite: bool = False) -> str:
        """POST /upload/image; returns the name a LoadImage input takes ("subfolder/name")."""
        with open(path, "rb") as f:
            content = f.read()
        name = (name or os.path.basename(path)).replace('"', "_")
        raw = self.request("POST", "/upload/image", timeout=60,
                           files={"image": (name, content, "application/octet-stream")},
                           data={"type": "input", "subfolder": subfolder, "overwrite": str(overwrite).lower()})
        info = json.loads(raw)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue_prompt(self, workflow: dict, *, prompt_id: str | None = None, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id (ComfyUI's 400 for an invalid workflow raises :class:`Refused`)."""
        body = {"prompt": workflow, "client_id": self.client_id}
        if prompt_id:
            body["prompt_id"] = prompt_id
        if extra_data:
            body["extra_data"] = extra_data
        return self.json("POST", "/prompt", body)["prompt_id"]

    def queue(self) -> tuple[set[str], set[str]]:
        """(running prompt ids, pending prompt ids)."""
        q = self.json("GET", "/queue", timeout=5)
        ids = lambda items: {str(item[1]) for item in items or [] if len(item) > 1}  # noqa: E731
        return ids(q.get("queue_running")), ids(q.get("queue_pending"))

    def delete_from_queue(self, prompt_ids: list[str]) -> None:
        self.json("POST", "/queue", {"delete": list(prompt_ids)})

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of a prompt, or None while the server does not have one."""
        return (self.json("GET", f"/history/{prompt_id}") or {}).get(prompt_id)

    def view(self, item: dict) -> bytes:
        """An output file ({filename, subfolder, type}) from GET /view."""
        params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                  "type": item.get("type", "output")}
        try:
            resp = self.session.get(self.url + "/view", params=params, timeout=120)
        except requests.RequestException as e:
            raise Unreachable(f"{self.url}: {_reason(e)}") from None
        if resp.status_code >= 400:
            raise Refused(resp.status_code, resp.content)
        return resp.content

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.json("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    # -- websocket

    def events(self, timeout: float = 1.0) -> Events:
        """Connect to /ws as this client; ``Events.next`` waits at most ``timeout`` seconds."""
        url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            ws = websocket.create_connection(url, timeout=10)
        except (websocket.WebSocketException, OSError) as e:
            raise Unreachable(f"no websocket at {url} ({e or type(e).__name__})") from None
        ws.settimeout(timeout)
        return Events(ws)


def _reason(e: Exception) -> str:
    """A short reason for a requests failure (the connection error, not the whole chain)."""
    inner = e.args[0] if e.args else e
    reason = getattr(inner, "reason", None)
    return str(reason or inner or type(e).__name__)


def output_items(entry: dict) -> list[dict]:
    """The saved images of a history entry, in node order (type "output": not previews or temp files)."""
    return [item for nid in sorted(entry.get("outputs") or {}, key=id_key)
            for item in entry["outputs"][nid].get("images", []) if item.get("type", "output") == "output"]


def server_error(data: dict) -> NodeError:
    """An execution_error event as an error naming the node; flux2kit's own messages without the type."""
    kind = str(data.get("exception_type") or "error").rsplit(".", 1)[-1]  # ComfyUI gives the module path
    message = str(data.get("exception_message") or "").strip()
    if kind not in ("Flux2KitError", "UnsupportedFormatError"):
        message = f"{kind}: {message}"
    return NodeError(str(data.get("node_id")), data.get("node_type") or "?", message)


def history_error(entry: dict, prompt_id: str) -> str | None:
    """Why a finished history entry failed (execution error or interruption), or None if it did not."""
    status = entry.get("status") or {}
    if status.get("status_str") != "error" and status.get("completed") is not False:
        return None
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            return str(server_error(data))
        if event == "execution_interrupted":
            return f"interrupted on the server (at node #{data.get('node_id')})"
    return f"the server reports that prompt {prompt_id} failed"


def prompt_errors(workflow: dict, body: bytes, code: int) -> str:
    """ComfyUI's 400 reply to /prompt as one message that names each node and problem."""
    try:
        reply = json.loads(body)
    except ValueError:
        return f"The server refused the workflow: HTTP {code} {body[:300]!r}"
    error = reply.get("error") or {}
    lines = [f"The server refused the workflow: {error.get('message', 'invalid prompt')}"
             + (f" ({error['details']})" if error.get("details") else "")]
    for nid, info in sorted((reply.get("node_errors") or {}).items(), key=lambda kv: id_key(kv[0])):
        ct = info.get("class_type") or workflow.get(nid, {}).get("class_type", "?")
        for err in info.get("errors", []):
            detail = f" [{err['details']}]" if err.get("details") else ""
            lines.append(f"  node #{nid} ({ct}): {err.get('message', '')}{detail}")
    return "\n".join(lines)
