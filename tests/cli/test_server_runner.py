"""``flux2kit run --server``: the server runner against a server speaking ComfyUI's protocol."""

import base64
import contextlib
import hashlib
import io
import json
import os
import struct
import urllib.parse

import numpy as np
import PIL.Image
import pytest

from flux2kit.pipelines.errors import Flux2KitError

API = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows", "api")


def workflow(stem):
    from flux2kit.cli.workflow.files import load_workflow

    return load_workflow(os.path.join(API, f"{stem}.json"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_runner")
    refs = []
    for i, (w, h) in enumerate([(96, 64), (64, 64), (64, 112)], start=1):
        rgb = (np.random.RandomState(i).rand(h, w, 3) * 255).astype(np.uint8)
        path = root / f"ref_{i}.png"
        PIL.Image.fromarray(rgb).save(path)
        refs.append(str(path))
    return {"refs": refs}


# -- against a ComfyUI server: a small stand-in speaking ComfyUI's HTTP and websocket protocol --------
# (tests/test_real_comfyui.py covers a real ComfyUI when COMFYUI_PATH is set)


class FakeComfyUI:
    """/upload/image, /prompt, /ws, /history, /view and /interrupt, with scripted websocket events."""

    PNG = None

    def __init__(self, events):
        import http.server
        import queue
        import threading

        self.events, self.uploads, self.prompts, self.clients = events, {}, [], {}
        self.queued = queue.Queue()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/upload/image":
                    name = body.split(b'filename="', 1)[1].split(b'"', 1)[0].decode()
                    fake.uploads[name] = body.split(b"\r\n\r\n", 4)[-1].rsplit(b"\r\n--", 2)[0]
                    return self.reply(200, {"name": name, "subfolder": "flux2kit", "type": "input"})
                if self.path == "/prompt":
                    request = json.loads(body)
                    bad = [nid for nid, n in request["prompt"].items() if n["class_type"] == "Bad"]
                    if bad:
                        return self.reply(400, {"error": {"type": "prompt_outputs_failed_validation", "message":
                                                          "Prompt outputs failed validation", "details": ""},
                                                "node_errors": {bad[0]: {"class_type": "Bad", "errors": [
                                                    {"message": "Value 80 bigger than max of 50",
                                                     "details": "num_inference_steps"}]}}})
                    fake.prompts.append(request)
                    fake.queued.put(request)
                    return self.reply(200, {"prompt_id": "p1", "number": 0, "node_errors": {}})
                self.reply(200, {})

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/ws":
                    return self.websocket(urllib.parse.parse_qs(url.query)["clientId"][0])
                if url.path == "/history/p1":
                    done = fake.events[-1][0] != "execution_error"
                    return self.reply(200, {"p1": {"outputs": {"7": {"images": [
                        {"filename": "text_to_image_00001_.png", "subfolder": "flux2kit", "type": "output"}]}},
                        "status": {"status_str": "success" if done else "error", "completed": done, "messages": []}}})
                if url.path == "/view":
                    fake.viewed = urllib.parse.parse_qs(url.query)
                    return self.reply(200, fake.PNG, "image/png")
                self.reply(404, {})

            def websocket(self, client_id):
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept.decode())
                self.end_headers()
                fake.clients[client_id] = True
                self.frame(0x1, json.dumps({"type": "status", "data": {"sid": client_id}}).encode())
                request = fake.queued.get(timeout=10)
                assert request["client_id"] == client_id
                for kind, data in fake.events:
                    if kind == "preview":
                        self.frame(0x2, struct.pack(">II", 1, 1) + b"\xff\xd8" + b"x" * 300)
                    else:
                        self.frame(0x1, json.dumps({"type": kind, "data": {**data, "prompt_id": "p1"}}).encode(),
                                   split=kind == "executed")
                with contextlib.suppress(OSError):
                    self.rfile.read(2)  # until the client closes

            def frame(self, opcode, payload, split=False):
                parts = [payload[:10], payload[10:]] if split else [payload]  # a fragmented message
                for i, part in enumerate(parts):
                    first = (opcode if i == 0 else 0) | (0x80 if i == len(parts) - 1 else 0)
                    n = len(part)
                    head = bytes([first, n]) if n < 126 else bytes([first, 126]) + struct.pack(">H", n)
                    self.wfile.write(head + part)
                self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


RUN_EVENTS = [
    ("execution_start", {}), ("execution_cached", {"nodes": ["1", "2", "3"]}),
    ("executing", {"node": "4"}), ("executing", {"node": "5"}), ("progress", {"value": 1, "max": 2, "node": "5"}),
    ("preview", {}), ("progress", {"value": 2, "max": 2, "node": "5"}), ("executing", {"node": "6"}),
    ("executing", {"node": "7"}),
    ("executed", {"node": "7", "output": {"images": [{"filename": "text_to_image_00001_.png", "subfolder": "flux2kit",
                                                      "type": "output"}]}}),
    ("execution_success", {}), ("executing", {"node": None}),
]


@pytest.fixture
def fake_server():
    servers = []

    def start(events):
        buffer = io.BytesIO()
        PIL.Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
        FakeComfyUI.PNG = buffer.getvalue()
        servers.append(FakeComfyUI(events))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_server_run_uploads_queues_follows_and_fetches(fake_server, folders, tmp_path):
    from flux2kit.cli.server_runner import ServerRunner
    from flux2kit.cli.workflow.overrides import apply_overrides

    server = fake_server(RUN_EVENTS)
    messages = []
    runner = ServerRunner(server.url, str(tmp_path), log=messages.append)
    wf = apply_overrides(workflow("three_reference_edit"), seed=9, images=folders["refs"])
    paths = runner.run(wf)
    sent = server.prompts[0]["prompt"]
    assert [sent[n]["inputs"]["image"] for n in ("5", "6", "7")] == ["flux2kit/ref_1.png", "flux2kit/ref_2.png",
                                                                      "flux2kit/ref_3.png"]
    with open(folders["refs"][0], "rb") as f:
        assert server.uploads["ref_1.png"] == f.read()
    assert sent["9"]["inputs"]["seed"] == 9 and server.prompts[0]["client_id"] in server.clients
    assert paths == [str(tmp_path / "flux2kit" / "text_to_image_00001_.png")]
    with open(paths[0], "rb") as f:
        assert f.read() == FakeComfyUI.PNG
    assert server.viewed == {"filename": ["text_to_image_00001_.png"], "subfolder": ["flux2kit"], "type": ["output"]}
    assert runner.cached == ["1", "2", "3"]
    assert "Cached on the server (unchanged since an earlier run): #1, #2, #3." in messages
    assert "#5 LoadImage..." in messages and "    step 2/2" in messages  # class types from the workflow
    assert runner.run(wf) == [str(tmp_path / "flux2kit" / "text_to_image_00001_-1.png")]  # never overwritten


def test_server_errors_name_the_node(fake_server, tmp_path):
    from flux2kit.cli.workflow.graph import NodeError
    from flux2kit.cli.server_runner import ServerRunner

    server = fake_server(RUN_EVENTS[:4] + [("execution_error", {
        "node_id": "5", "node_type": "Flux2KitSampler",
        "exception_type": "/ComfyUI/custom_nodes/flux2kit.pipelines.errors.Flux2KitError",
        "exception_message": "Size 4096x2048 is not valid.\n"})])
    runner = ServerRunner(server.url, str(tmp_path), log=lambda m: None)
    with pytest.raises(NodeError, match=r"^node #5 \(Flux2KitSampler\): Size 4096x2048 is not valid.$"):
        runner.run(workflow("text_to_image"))
    wf = workflow("text_to_image")
    wf["5"]["class_type"] = "Bad"
    with pytest.raises(Flux2KitError, match=r"refused the workflow: Prompt outputs failed validation\n"
                                            r"  node #5 \(Bad\): Value 80 bigger than max of 50 \[num_inference_steps\]"):
        runner.run(wf)
    with pytest.raises(Flux2KitError, match="Cannot reach the ComfyUI server at http://127.0.0.1:9"):
        ServerRunner("127.0.0.1:9", str(tmp_path), log=lambda m: None).run(workflow("text_to_image"))
