"""The fake ComfyUI (flux2kit.testing.fake_comfyui) speaks ComfyUI's protocol byte for byte where flux2kit's client
depends on it, and the real-ComfyUI harness (flux2kit.testing.real_comfyui) works through the one client against it.

What real ComfyUI sends is checked against a real server by tests/nodes/test_real_comfyui.py (COMFYUI_PATH).
"""

import json
import os
import re
import struct

import pytest

API = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows", "api")


def text_to_image(seed, **changes):
    from flux2kit.cli.workflow.files import load_workflow
    from flux2kit.cli.workflow.overrides import apply_overrides

    return apply_overrides(load_workflow(os.path.join(API, "text_to_image.json")), seed=seed,
                           **{"size": (80, 64), "steps": 2, **changes})


def messages_of(ws, prompt_id):
    """The websocket messages of one prompt, up to its ``executing`` with node None, read frame by frame.

    [(opcode, payload, number of frames)]: text (1) and binary (2) messages; fragments reassembled here.
    """
    out, parts = [], []
    while True:
        frame = ws.recv_frame()
        if frame.opcode not in (0x0, 0x1, 0x2):
            continue  # ping / pong / close
        parts.append(frame)
        if not frame.fin:
            continue
        opcode, payload, count = parts[0].opcode, b"".join(bytes(f.data) for f in parts), len(parts)
        assert all(f.opcode == 0x0 for f in parts[1:]), "fragments after the first are continuation frames"
        parts = []
        out.append((opcode, payload, count))
        if opcode == 0x1:
            event = json.loads(payload)
            if event["type"] == "executing" and event["data"]["node"] is None and \
                    event["data"].get("prompt_id") == prompt_id:
                return out


def describe(messages):
    """Each message as ("kind", data) or ("binary <type>", payload after the type)."""
    out = []
    for opcode, payload, _ in messages:
        if opcode == 0x1:
            event = json.loads(payload)
            out.append((event["type"], event["data"]))
        else:
            out.append((f"binary {struct.unpack('>I', payload[:4])[0]}", payload[4:]))
    return out


def test_the_server_speaks_comfyuis_websocket_protocol(fake_comfyui):
    from flux2kit.cli.comfy_client import ComfyClient

    client = ComfyClient(fake_comfyui.url)
    events = client.events(timeout=60)
    ws = events.ws
    try:
        first = ws.recv()
        assert json.loads(first)["type"] == "status" and json.loads(first)["data"]["sid"] == client.client_id
        prompt = f"a lighthouse, run {client.client_id}"  # new to the server: Text Encode runs
        a = client.queue_prompt(text_to_image(21, prompt=prompt))
        run_a = describe(messages_of(ws, a))
        b = client.queue_prompt(text_to_image(22, prompt=prompt))
        raw_b = messages_of(ws, b)
    finally:
        events.close()
    # the first run: Text Encode's status text is a binary frame: type 3, node id, text
    assert [k for k, _ in run_a[:2]] == ["execution_start", "execution_cached"]
    ran = [d["node"] for k, d in run_a if k == "executing"]
    assert ran[-5:] == ["4", "5", "6", "7", None] and run_a[-2][0] == "execution_success"
    # (and the Sampler's: its notes, empty here, which clears an earlier run's notes on the node)
    text, sampler = [p for k, p in run_a if k == "binary 3"]
    n = struct.unpack(">I", text[:4])[0]
    assert text[4:4 + n] == b"4" and re.fullmatch(rb"\d+ of \d+ tokens", text[4 + n:])
    assert sampler == struct.pack(">I", 1) + b"5"
    # the second, in ComfyUI's order: the unchanged nodes reported cached, then only the others run
    run_b = describe(raw_b)
    kinds = [k for k, _ in run_b]
    assert kinds == ["execution_start", "execution_cached", "executing", "progress", "binary 1", "progress", "binary 1",
                     "binary 3", "executing", "executing", "executed", "execution_success", "executing"], kinds
    data = [d for _, d in run_b]
    assert data[1] == {"nodes": ["1", "2", "3", "4"], "prompt_id": b}
    assert [d["node"] for k, d in run_b if k == "executing"] == ["5", "6", "7", None]
    assert [(d["value"], d["max"], d["node"]) for k, d in run_b if k == "progress"] == [(1, 2, "5"), (2, 2, "5")]
    preview = data[4]
    assert struct.unpack(">I", preview[:4])[0] == 1 and preview[4:6] == b"\xff\xd8"  # format 1: a JPEG
    assert all(d["prompt_id"] == b for k, d in run_b if not k.startswith("binary"))
    # "executed" comes in two frames (a first fragment and a continuation), which clients must reassemble
    (executed,) = [(payload, count) for opcode, payload, count in raw_b if opcode == 0x1 and b'"executed"' in payload]
    assert executed[1] == 2
    output = json.loads(executed[0])["data"]
    assert output["node"] == "7" and output["output"]["images"][0]["filename"].endswith(".png")
    assert output["output"] == client.history(b)["outputs"]["7"]
    # the history holds the same events, cached nodes included
    status = client.history(b)["status"]
    assert status["status_str"] == "success" and status["completed"]
    assert [m[0] for m in status["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert status["messages"][1][1]["nodes"] == ["1", "2", "3", "4"]


def test_uploads_follow_comfyuis_naming(fake_comfyui, tmp_path):
    from flux2kit.cli.comfy_client import ComfyClient
    from flux2kit.testing.pictures import png_bytes

    client = ComfyClient(fake_comfyui.url)
    first, other = tmp_path / "a" / "same.png", tmp_path / "b" / "same.png"
    for path, seed in ((first, 1), (other, 2)):
        path.parent.mkdir()
        path.write_bytes(png_bytes(16, 16, seed=seed))
    assert client.upload_image(str(first), subfolder="naming") == "naming/same.png"
    assert client.upload_image(str(first), subfolder="naming") == "naming/same.png"  # the same content: kept
    assert client.upload_image(str(other), subfolder="naming") == "naming/same (1).png"  # other content: renamed
    assert client.upload_image(str(other), subfolder="naming", overwrite=True) == "naming/same.png"
    folder = fake_comfyui.root / "input" / "naming"
    assert sorted(os.listdir(folder)) == ["same (1).png", "same.png"]
    assert (folder / "same.png").read_bytes() == other.read_bytes()


def test_the_real_comfyui_harness_talks_through_the_one_client(fake_comfyui, tmp_path):
    """The harness's HTTP side (the real-ComfyUI tests need COMFYUI_PATH; this runs everywhere)."""
    from flux2kit.testing.pictures import png_bytes
    from flux2kit.testing.real_comfyui import ComfyUIError, ComfyUIServer

    port = int(fake_comfyui.url.rsplit(":", 1)[1])
    harness = ComfyUIServer(tmp_path / "no-comfyui", "python", tmp_path, fake_comfyui.models, port=port)  # no process
    assert harness.url == fake_comfyui.url and harness.client.url == fake_comfyui.url
    assert list(harness.object_info("Flux2KitSampler")) == ["Flux2KitSampler"]
    assert "Flux2KitSampler" in harness.object_info() and "queue_pending" in harness.get_json("/queue")
    assert harness.upload_image("harness_ref.png", png_bytes(24, 16, seed=4), subfolder="harness") == {
        "name": "harness_ref.png", "subfolder": "harness", "type": "input"}
    run = harness.run(text_to_image(31), timeout=120)
    assert run.ok, run.describe()
    (image,) = run.images()
    assert image["node"] == "7" and image["type"] == "output"
    assert harness.view(image) == (fake_comfyui.root / "output" / image["subfolder"] / image["filename"]).read_bytes()
    again = harness.run(text_to_image(31), timeout=120)
    assert again.ok and again.cached == {"1", "2", "3", "4", "5", "6"}  # all but the output node, as ComfyUI keeps them
    failed = harness.run(text_to_image(31, size=(4096, 2048)), timeout=120)
    assert not failed.ok and failed.error["node_id"] == "5" and failed.error["node_type"] == "Flux2KitSampler"
    assert failed.error["exception_type"].endswith(".Flux2KitError") and "Size 4096x2048" in failed.describe()
    bad = text_to_image(31)
    bad["5"]["inputs"]["num_inference_steps"] = 80
    with pytest.raises(ComfyUIError) as e:
        harness.run(bad)
    assert e.value.status == 400
    (problem,) = e.value.body["node_errors"]["5"]["errors"]
    assert e.value.body["node_errors"]["5"]["class_type"] == "Flux2KitSampler"
    assert problem["extra_info"]["input_name"] == "num_inference_steps" and "above the maximum 50" in problem["message"]
    with pytest.raises(ComfyUIError) as e:
        harness.view({"filename": "missing.png", "subfolder": "", "type": "output"})
    assert e.value.status == 404
    assert harness.post_json("/interrupt", {}) == {}


def test_the_real_comfyui_harness_names_the_requirements_comfyuis_python_lacks(monkeypatch, tmp_path):
    """Before starting ComfyUI the harness asks its Python (here this one) which of flux2kit's requirements it
    lacks: gguf and accelerate, for GGUF files, are easy to miss in an existing ComfyUI venv."""
    import sys

    from flux2kit.testing import real_comfyui

    wanted = real_comfyui.requirements()
    assert wanted["gguf"] == "gguf>=0.19" and wanted["accelerate"] == "accelerate>=0.26" and "torch" not in wanted
    assert real_comfyui.missing_requirements(sys.executable) == []
    real_comfyui.check_requirements(sys.executable)  # this venv has them all
    monkeypatch.setattr(real_comfyui, "requirements",
                        lambda: {**wanted, "flux2kit-no-such-package": "flux2kit-no-such-package>=1"})
    (tmp_path / "main.py").write_text("")  # a ComfyUI checkout as far as the harness looks before starting it
    monkeypatch.setattr(real_comfyui, "REQUIRED_MODULES", ("torch", "safetensors"))  # ComfyUI's own: not here
    with pytest.raises(real_comfyui.MissingRequirements) as e:
        real_comfyui.comfyui_server(tmp_path, comfyui=tmp_path, python=sys.executable).__enter__()
    assert f"{sys.executable} -m pip install 'flux2kit-no-such-package>=1'" in str(e.value)
    assert "lacks flux2kit's requirements flux2kit-no-such-package>=1 " in str(e.value)
    assert not (tmp_path / "models").exists()  # refused before building anything
