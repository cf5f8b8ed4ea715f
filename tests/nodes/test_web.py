"""The browser extension in web/: its JavaScript tests (node's test runner), its contract with the Python nodes
(the estimate, the size rule and the unused inputs computed both ways), and (with COMFYUI_PATH) that a real
ComfyUI serves it and sends the previews it draws."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from flux2kit.testing.real_comfyui import REPO

WEB = REPO / "web"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node (Node.js 18+) is not installed: the JavaScript tests need it")
def test_javascript_unit_tests_pass():
    result = subprocess.run([NODE, "--test", "web/tests"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.M)
    assert passed and int(passed.group(1)) >= 8, result.stdout[-2000:]
    assert re.search(r"^# fail 0$", result.stdout, re.M)


EXTENSIONS = sorted(WEB.glob("*.js"))
LIBS = sorted((WEB / "lib").glob("*.js"))
FRONTEND_API = {"../../scripts/app.js", "../../scripts/api.js"}  # ComfyUI's public extension modules


def _imports(path) -> list[str]:
    return re.findall(r'^import\s[^;]*?\sfrom\s+"([^"]+)";', path.read_text(encoding="utf-8"), re.M | re.S)


def test_extensions_use_only_the_public_frontend_api():
    assert {p.name for p in EXTENSIONS} >= {"flux2kit_prompts.js", "flux2kit_api.js", "flux2kit_inputs.js"}
    for path in EXTENSIONS:
        found = _imports(path)
        assert found and "../../scripts/app.js" in found, path.name
        for target in found:
            assert target in FRONTEND_API or (target.startswith("./lib/") and (WEB / target).is_file()), (path.name, target)
    for path in LIBS:  # pure modules: tested in node, no ComfyUI, no DOM
        assert all(t.startswith("./") and (WEB / "lib" / t).is_file() for t in _imports(path)), path.name
        assert "document." not in path.read_text(encoding="utf-8"), path.name
    # ComfyUI loads every web/**/*.js as an extension: tests must not be .js files there
    assert not list((WEB / "tests").glob("*.js"))


@pytest.mark.skipif(NODE is None, reason="node (Node.js 18+) is not installed")
@pytest.mark.parametrize("path", EXTENSIONS + LIBS, ids=lambda p: p.name)
def test_every_module_parses(path):
    result = subprocess.run([NODE, "--check", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _node_eval(script: str, data) -> object:
    """Run an ES module in node with ``data`` as the global DATA; its printed JSON."""
    code = f"globalThis.DATA = {json.dumps(data)};\n" + script
    result = subprocess.run([NODE, "--input-type=module", "-e", code], cwd=WEB, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.skipif(NODE is None, reason="node (Node.js 18+) is not installed")
def test_the_browser_estimate_agrees_with_the_node(comfy):
    """The browser's estimate (web/lib/hosted.js on the table the server sends) against the node's own
    (providers.plan) for every model, size rule, batch size and reference count: equal when the inputs fix the
    price, the node's value inside the browser's range when the references' sizes are still unknown."""
    import PIL.Image

    from flux2kit.nodes import api
    from flux2kit.pipelines.hosted import providers as AP

    table = json.loads(json.dumps(api.browser_table()))  # as the route sends it
    refs = [PIL.Image.new("RGB", size) for size in ((300, 200), (2048, 1536), (640, 640))]
    cases = []
    for key, (provider, model) in api.MODELS.items():
        for aspect, resolution, width, height in (("1:1", "1 MP", 0, 0), ("16:9", "2 MP", 0, 0), ("3:4", "0.5 MP", 0, 0),
                                                  ("9:16", "4 MP", 0, 0), ("1:1", "1 MP", 1360, 768),
                                                  ("2:3", "1 MP", 2048, 2048), ("match_input_image", "1 MP", 0, 0)):
            for batch, count in ((1, 0), (3, 0), (1, 1), (2, 2), (1, 3)):
                if aspect == "match_input_image" and not count:
                    continue
                plan = AP.make_provider(provider, model).plan(AP.Request(
                    prompt="x", images=refs[:count], aspect_ratio=aspect, resolution=resolution, width=width,
                    height=height, batch_size=batch))
                cases.append({"inputs": {"model": key, "aspect_ratio": aspect, "resolution": resolution, "width": width,
                                         "height": height, "batch_size": batch, "references": count},
                              "python": plan.estimated_usd})
    got = _node_eval("""
        import { estimateCost } from "./lib/hosted.js";
        console.log(JSON.stringify(DATA.cases.map((c) => estimateCost(DATA.table, c.inputs))));
    """, {"table": table, "cases": cases})
    exact = ranged = 0
    for case, js in zip(cases, got):
        where = case["inputs"]
        if case["python"] is None:
            assert not js["known"], where
            continue
        assert js["known"], where
        if where["references"] == 0:
            assert js["low"] == pytest.approx(case["python"]) == js["high"], where
            exact += 1
        elif js.get("about"):  # image 1's shape sets the size: close to the resolution, one MP step at most
            step = table["models"][where["model"]]["price"][1] * where["batch_size"]
            assert js["low"] - step - 1e-9 <= case["python"] <= js["high"] + step + 1e-9, where
        else:
            assert js["low"] - 1e-9 <= case["python"] <= js["high"] + 1e-9, (where, case["python"], js)
            ranged += 1
    assert exact >= 40 and ranged >= 20


def js_settings(text: str) -> dict[str, str]:
    """setting id -> the first string of its tooltip, from the ``settings`` list of web/flux2kit_api.js."""
    start = text.index("settings: [")
    block = text[start: text.index("\n  ],", start)]
    return dict(re.findall(r'\bid:\s*"([^"]+)".*?\btooltip:\s*"([^"]*)"', block, re.S))


def setting_mismatches(js_text: str) -> list[str]:
    """Where the browser's API-key settings and the node that reads them (nodes/api.py SETTING_IDS) disagree."""
    from flux2kit.nodes.api import SETTING_IDS
    from flux2kit.pipelines.hosted import providers as AP

    found = js_settings(js_text)
    problems = [f"the browser registers {sid!r}, which no provider reads" for sid in sorted(set(found) - set(SETTING_IDS.values()))]
    for provider, sid in sorted(SETTING_IDS.items()):
        if sid not in found:
            problems.append(f"{provider}: the node reads {sid!r}, which the browser does not register")
        elif AP.PROVIDERS[provider].key_env not in found[sid]:
            problems.append(f"{provider}: the tooltip of {sid!r} does not name {AP.PROVIDERS[provider].key_env}")
    return problems


def test_the_browser_registers_the_settings_the_node_reads(comfy):
    assert setting_mismatches((WEB / "flux2kit_api.js").read_text(encoding="utf-8")) == []


def test_setting_check_catches_a_renamed_setting(comfy):
    """Mutation: the Oxen key setting registered under another id than the one nodes/api.py reads."""
    text = (WEB / "flux2kit_api.js").read_text(encoding="utf-8")
    assert '"Flux2Kit.API.OxenKey"' in text
    problems = setting_mismatches(text.replace('"Flux2Kit.API.OxenKey"', '"Flux2Kit.API.OxenAPIKey"'))
    assert any("oxen: the node reads 'Flux2Kit.API.OxenKey'" in p for p in problems), problems


@pytest.mark.skipif(NODE is None, reason="node (Node.js 18+) is not installed")
def test_the_browser_hex_parser_is_the_engines():
    """normalizeHex (web/lib/preview.js) against parse_hex on generated forms: every length, case, prefix,
    stray character and alpha; the same canonical colour or both refuse."""
    from flux2kit.pipelines.errors import Flux2KitError
    from flux2kit.pipelines.prompting.palette import parse_hex

    digits = "0a1B2c3D4e5F6"
    forms = set()
    for n in range(0, 10):
        for body in (digits[:n], digits[:n].upper(), digits[:n].lower(), (digits[:n] + "g")[:n]):
            for prefix in ("", "#", "##", " #", "# "):
                for suffix in ("", " ", "\n", "ff", "FF", "80", "00"):
                    forms.add(prefix + body + suffix)
    forms = sorted(forms)
    js = _node_eval("""
        import { normalizeHex } from "./lib/preview.js";
        console.log(JSON.stringify(DATA.map((t) => normalizeHex(t))));
    """, forms)
    differ = []
    for text, browser in zip(forms, js):
        try:
            engine = parse_hex(text)
        except Flux2KitError:
            engine = None
        if engine != browser:
            differ.append((text, engine, browser))
    assert len(forms) > 800 and not differ, differ[:20]


@pytest.mark.skipif(NODE is None, reason="node (Node.js 18+) is not installed")
def test_the_browser_size_rule_is_the_engines():
    from flux2kit.pipelines.parameters import ASPECT_RATIOS, RESOLUTIONS, size_from_aspect

    cases = [(a, r, first) for a in ASPECT_RATIOS for r in RESOLUTIONS
             for first in ([(300, 200), (97, 1000), (4000, 37), (1024, 1024)] if a == "match_input_image" else [None])]
    from flux2kit.pipelines.parameters import MAX_PIXELS, MAX_SIDE, MEGAPIXEL, MIN_SIDE, SIZE_MULTIPLE

    size = {"megapixel": MEGAPIXEL, "resolutions": RESOLUTIONS, "multiple": SIZE_MULTIPLE, "min_side": MIN_SIDE,
            "max_side": MAX_SIDE, "max_pixels": MAX_PIXELS}
    got = _node_eval("""
        import { sizeFromAspect } from "./lib/hosted.js";
        console.log(JSON.stringify(DATA.cases.map(([a, r, f]) => sizeFromAspect(DATA.size, a, r, f))));
    """, {"size": size, "cases": cases})
    assert [tuple(g) for g in got] == [size_from_aspect(a, r, f) for a, r, f in cases]


@pytest.mark.skipif(NODE is None, reason="node (Node.js 18+) is not installed")
def test_the_inputs_shown_unused_are_the_ones_the_node_does_not_send(comfy):
    from flux2kit.nodes import api
    from flux2kit.pipelines.hosted import providers as AP

    table = json.loads(json.dumps(api.browser_table()))
    cases = [(key, fmt) for key in api.MODELS for fmt in ("png", "webp", "jpeg")]
    got = _node_eval("""
        import { unusedApiInputs } from "./lib/hosted.js";
        console.log(JSON.stringify(DATA.cases.map(([m, f]) => Object.keys(unusedApiInputs(DATA.table, m, f)))));
    """, {"table": table, "cases": cases})
    for (key, fmt), unused in zip(cases, got):
        provider, model = api.MODELS[key]
        body = AP.make_provider(provider, model).plan(AP.Request(prompt="x", output_format=fmt)).jobs[0].body
        sends_steps = "steps" in body or "num_inference_steps" in body
        assert ("num_inference_steps" in unused) == ("guidance" in unused) == (not sends_steps), (key, fmt)
        # output_quality: BFL never takes it; Oxen applies it to webp and jpeg (its tooltip says so)
        assert ("output_quality" in unused) == (provider == "bfl" or fmt == "png"), (key, fmt)


def test_preview_widget_is_not_saved_in_the_workflow():
    # The frontend leaves a widget out of widgets_values only when widget.serialize === false (as ComfyUI's own
    # audio and image previews set it); addDOMWidget's options.serialize only keeps it out of the API prompt.
    source = (WEB / "flux2kit_prompts.js").read_text(encoding="utf-8")
    assert re.search(r"const (\w+) = this\.addDOMWidget\(WIDGET,", source)
    name = re.search(r"const (\w+) = this\.addDOMWidget\(WIDGET,", source).group(1)
    assert re.search(rf"\b{name}\.serialize = false;", source)


def test_preview_node_types_are_the_nodes_that_send_previews(comfy):
    from flux2kit.nodes import prompts, upsample

    source = (WEB / "lib" / "preview.js").read_text(encoding="utf-8")
    listed = re.search(r"PREVIEW_NODE_TYPES = \[(.*?)\]", source, re.S).group(1)
    assert set(re.findall(r'"(Flux2Kit\w+)"', listed)) == {
        cls.define_schema().node_id for cls in prompts.NODES + upsample.NODES}


def test_preview_keys_match_what_the_nodes_send(comfy):
    """The keys the JavaScript reads are the keys the Python nodes put in their ui output."""
    from flux2kit.nodes import prompts

    out = prompts.JSONPrompt.execute(scene="a fox", palette=prompts.HexPalette.execute(
        colors="#02EB3C the fox", use_pickers=0).result[0])
    source = (WEB / "lib" / "preview.js").read_text(encoding="utf-8")
    read = set(re.findall(r"output\.(flux2kit_\w+)", source))
    assert read == set(out.ui) == {"flux2kit_preview", "flux2kit_status", "flux2kit_warning", "flux2kit_colors"}
    json.dumps(out.ui)  # sent to the browser as JSON


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_real_comfyui_serves_the_extension_and_sends_previews(comfyui):
    listed = comfyui.get_json("/extensions")
    ours = {p for p in listed if p.startswith("/extensions/flux2kit/")}
    assert {"/extensions/flux2kit/flux2kit_prompts.js", "/extensions/flux2kit/lib/preview.js"} <= ours
    assert not any(p.startswith("/extensions/flux2kit/tests/") for p in ours)  # the .mjs tests are never loaded
    body = comfyui.request("GET", "/extensions/flux2kit/flux2kit_prompts.js")  # an HTTP error raises ComfyUIError
    assert b"app.registerExtension" in body
    body = comfyui.request("GET", "/extensions/flux2kit/lib/preview.js")
    assert b"export function previewModel" in body
    # a palette node's ui output reaches the client (history holds what the websocket sent)
    run = comfyui.run({
        "1": {"class_type": "Flux2KitHexPalette",
              "inputs": {"colors": "#1E3A5F", "use_pickers": 1, "color_1": "#02eb3c", "object_1": "the vase",
                         **{f"color_{i}": "#ffffff" for i in range(2, 6)},
                         **{f"object_{i}": "" for i in range(2, 6)}}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
        "3": {"class_type": "Flux2KitJSONPrompt",
              "inputs": {"scene": 'a studio, "quoted" 你好', "palette": ["1", 0], "reference_count": 0,
                         **{k: "" for k in ("style", "lighting", "mood", "background", "composition", "camera_angle",
                                            "camera_lens", "depth_of_field")}}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    })
    assert run.ok, run.describe()
    outputs = run.outputs
    prompt_ui = outputs["3"]
    assert json.loads(prompt_ui["flux2kit_preview"][0]) == {
        "scene": "a studio, \"quoted\" 你好", "color_palette": ["#02EB3C for the vase", "#1E3A5F"]}
    assert prompt_ui["flux2kit_status"][0].endswith("of 512 tokens (estimate)")
    assert prompt_ui["flux2kit_warning"] == [False]
    assert outputs["4"]["text"] == [
        '{"scene":"a studio, \\"quoted\\" 你好","color_palette":["#02EB3C for the vase","#1E3A5F"]}']
    assert outputs["1"]["flux2kit_colors"] == [{"hex": "#02EB3C", "name": "lime", "object": "the vase"},
                                               {"hex": "#1E3A5F", "name": "dark slate blue", "object": ""}]
    assert len(outputs["2"]["images"]) == 1


# The extension in a real browser (headless Chromium on a real ComfyUI page): tests/nodes/test_web_browser.py
