"""The API node in a real ComfyUI (COMFYUI_PATH): registered with its DynamicCombo, the settings extension
served, and the two-reference workflow run against the local BFL stand-in with the key from ComfyUI's settings."""

from __future__ import annotations

import json
import os
import urllib.parse

import pytest

from flux2kit.testing.hosted_api import ApiServer
from flux2kit.testing.pictures import png_bytes
from flux2kit.testing.real_comfyui import REPO

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]

KEY = "sk-real-comfy-test-0a1b2c3d4e-SECRET"
SETTING = "Flux2Kit.API.BFLKey"


def test_api_node_is_registered_with_its_dynamic_combo(comfyui):
    info = comfyui.object_info("Flux2KitAPIGenerate")["Flux2KitAPIGenerate"]
    kind, spec = info["input"]["required"]["model"]
    assert kind == "COMFY_DYNAMICCOMBO_V3"
    options = {o["key"]: o["inputs"] for o in spec["options"]}
    assert list(options["BFL flux-2-pro"]["required"]) == ["safety_tolerance"]
    assert list(options["Oxen flux-2-pro"]["required"]) == ["disable_safety_checker", "mode"]
    assert info["output"] == ["IMAGE", "STRING", "STRING", "FLOAT"]
    assert not info.get("api_node")  # our own-key node: not a comfy.org partner node (see README)
    names = set(info["input"]["required"]) | set(info["input"].get("optional", {}))
    assert not any("key" in n.lower() for n in names)
    extensions = comfyui.get_json("/extensions")
    assert any(e.endswith("/flux2kit_api.js") for e in extensions), extensions


def test_two_reference_workflow_with_the_key_from_settings(comfyui, tmp_path):
    with open(REPO / "workflows" / "api" / "api_two_references.json", encoding="utf-8") as f:
        prompt = json.load(f)
    with ApiServer(key=KEY) as api:
        comfyui.post_json(f"/settings/{urllib.parse.quote(SETTING)}", KEY)
        try:
            for nid, size in (("1", (96, 64)), ("2", (64, 80))):
                name = f"flux2kit_api_ref{nid}.png"
                reply = comfyui.upload_image(name, png_bytes(*size, seed=int(nid)))
                prompt[nid]["inputs"]["image"] = reply["name"]
            prompt["3"]["inputs"]["base_url"] = api.url  # loopback: trusted with the key
            prompt["3"]["inputs"]["seed"] = 1234
            run = comfyui.run(prompt, timeout=120)
            assert run.ok, run.describe()
        finally:
            comfyui.post_json(f"/settings/{urllib.parse.quote(SETTING)}", "")
        subs = api.submissions()
        assert len(subs) == 1 and subs[0]["headers"]["x-key"] == KEY
        body = json.loads(subs[0]["body"])
        assert body["seed"] == 1234 and (body["width"], body["height"]) == (1248, 832)  # 3:2 from image 1
        assert "input_image_2" in body
        images = run.images()
        assert len(images) == 1
        saved = comfyui.view(images[0])
        assert saved[:8] == b"\x89PNG\r\n\x1a\n" and KEY.encode() not in saved
        history = comfyui.get_json(f"/history/{run.prompt_id}")
        assert KEY not in json.dumps(history)
        assert KEY not in comfyui.log()


def test_cancel_stops_polling_promptly(comfyui):
    import time

    with open(REPO / "workflows" / "api" / "api_two_references.json", encoding="utf-8") as f:
        prompt = json.load(f)
    with ApiServer(key=KEY) as api:
        api.reset({"poll": "never"})
        comfyui.post_json(f"/settings/{urllib.parse.quote(SETTING)}", KEY)
        try:
            for nid in ("1", "2"):
                reply = comfyui.upload_image(f"flux2kit_api_cancel{nid}.png", png_bytes(64, 64, seed=int(nid)))
                prompt[nid]["inputs"]["image"] = reply["name"]
            prompt["3"]["inputs"].update(base_url=api.url, seed=99)
            prompt_id = comfyui.queue(prompt)
            deadline = time.monotonic() + 60
            while sum(r["method"] == "GET" for r in api.requests) < 2:
                assert time.monotonic() < deadline, "the node never polled"
                time.sleep(0.1)
            comfyui.post_json("/interrupt", {})
            run = comfyui.wait(prompt_id, timeout=30)
        finally:
            comfyui.post_json(f"/settings/{urllib.parse.quote(SETTING)}", "")
        assert run.event("execution_interrupted") is not None, run.describe()
        polls = sum(r["method"] == "GET" for r in api.requests)
        time.sleep(3.0)  # longer than the poll interval: no poll may follow the cancel
        assert sum(r["method"] == "GET" for r in api.requests) == polls
        assert len(api.submissions()) == 1
