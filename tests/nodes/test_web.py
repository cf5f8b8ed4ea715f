"""The browser extension in web/: its JavaScript tests (node's test runner), its contract with the Python nodes,
and (with COMFYUI_PATH) that a real ComfyUI serves it and sends the previews it draws."""

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


@pytest.mark.skipif(NODE is None, reason="node (Node.js 18+) is not installed")
def test_extension_parses_as_a_module():
    result = subprocess.run([NODE, "--check", "web/flux2kit_prompts.js"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_extension_uses_only_the_public_frontend_api():
    source = (WEB / "flux2kit_prompts.js").read_text(encoding="utf-8")
    imports = re.findall(r'^import .* from "([^"]+)";', source, re.M)
    assert imports == ["../../scripts/app.js", "./lib/preview.js"]
    # ComfyUI loads every web/**/*.js as an extension: tests must not be .js files there
    assert not list((WEB / "tests").glob("*.js"))


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


# -- the extension in a real browser: headless Chromium on a real ComfyUI page --------------------

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)

_GRAPH_JS = """(async () => {
  const app = window.comfyAPI.app.app;
  app.graph.clear();
  const add = (type, pos, size) => { const n = LiteGraph.createNode(type); n.pos = pos; if (size) n.setSize(size);
                                     app.graph.add(n); return n; };
  const pal = add("Flux2KitHexPalette", [0, 0], [380, 640]);
  const prompt = add("Flux2KitJSONPrompt", [420, 0], [420, 760]);
  const long = add("Flux2KitJSONPrompt", [880, 300], [420, 400]);
  const show = add("PreviewAny", [880, 0]);
  const showLong = add("PreviewAny", [1320, 300]);
  const swatches = add("PreviewImage", [1320, 0]);
  pal.widgets.find((w) => w.name === "object_1").value = "the vase";
  prompt.widgets.find((w) => w.name === "scene").value = 'a sunlit studio, "quoted"';
  long.widgets.find((w) => w.name === "scene").value = "a very long description of a kitchen ".repeat(80);
  pal.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "palette"));
  pal.connect(2, swatches, 0);
  prompt.connect(0, show, 0);
  long.connect(0, showLong, 0);
  window.__f2k = { pal, prompt, long };
  await app.queuePrompt(0);
  return true;
})()"""

_RESULT_JS = """(() => {
  const { pal, prompt, long } = window.__f2k;
  if (!(pal.flux2kitPreview && prompt.flux2kitPreview && long.flux2kitPreview)) return null;
  const parts = (n) => ({ status: n.flux2kitParts.status.textContent, statusShown: n.flux2kitParts.status.style.display,
                          text: n.flux2kitParts.text.textContent,
                          chips: [...n.flux2kitParts.swatches.children]
                            .map((c) => [c.textContent, c.style.background]) });
  return { pal: parts(pal), prompt: parts(prompt), long: parts(long),
           widgets: pal.widgets.map((w) => w.name), saved: pal.serialize().widgets_values };
})()"""


class _Chromium:
    """Headless Chromium driven over the DevTools protocol (flux2kit's stdlib websocket client)."""

    def __init__(self, binary: str, profile: str):
        import socket
        import time
        import urllib.request

        from flux2kit.headless import _WebSocket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--disable-dev-shm-usage",
                                      f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                                      "--window-size=1700,1000", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as f:
                    page = next(t for t in json.load(f) if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    pytest.fail("headless Chromium did not start")
                time.sleep(0.3)
        self.ws = _WebSocket(page["webSocketDebuggerUrl"], timeout=120)
        self.ids = 0
        self.errors = []

    def call(self, method, **params):
        self.ids += 1
        self.ws.send(0x1, json.dumps({"id": self.ids, "method": method, "params": params}).encode())
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:1000])
            if msg.get("id") == self.ids:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]

    def evaluate(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in r, json.dumps(r["exceptionDetails"])[:2000]
        return r["result"].get("value")

    def wait_for(self, expression, timeout=180.0):
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        pytest.fail(f"timed out waiting for {expression[:80]}")

    def close(self):
        if getattr(self, "ws", None):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium to test the extension in a browser")
def test_previews_show_on_the_nodes_in_a_real_browser(comfyui, tmp_path):
    import base64
    import time

    comfyui.post_json("/settings/Comfy.TutorialCompleted", True)  # no first-run templates dialog over the graph
    browser = _Chromium(CHROMIUM, str(tmp_path / "profile"))
    try:
        browser.call("Runtime.enable")
        browser.call("Page.enable")
        browser.call("Page.navigate", url=comfyui.url)
        browser.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.LiteGraph)")
        browser.wait_for("window.comfyAPI.app.app.extensions.some((e) => e.name === 'flux2kit.promptPreviews')")
        browser.wait_for("!!(LiteGraph.registered_node_types['Flux2KitHexPalette'] && "
                         "LiteGraph.registered_node_types['PreviewAny'])")
        browser.wait_for("window.comfyAPI.api.api.socket?.readyState === 1")  # "executed" events need the socket
        # the frontend opens its default workflow once it is ready; a graph built before that would be replaced
        browser.wait_for("window.comfyAPI.app.app.graph.nodes.length > 0")
        browser.evaluate(_GRAPH_JS)
        try:
            result = browser.wait_for(_RESULT_JS)
        except BaseException:
            history = comfyui.get_json("/history")
            print("history:", json.dumps(history)[:3000])
            print("graph:", browser.evaluate(
                "JSON.stringify(window.comfyAPI.app.app.graph.nodes.map((n) => [n.id, n.type]))"))
            raise
        browser.evaluate("(() => { const c = window.comfyAPI.app.app.canvas; c.ds.offset = [80, 80]; c.ds.scale = 0.8; "
                         "c.setDirty(true, true); return true; })()")
        time.sleep(2)  # let the canvas draw: the screenshot is for a person, nothing is asserted on it
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "previews.png").write_bytes(base64.b64decode(shot))  # for a person to look at
    finally:
        browser.close()
    assert not [e for e in browser.errors if "flux2kit" in e], browser.errors
    assert result["pal"]["chips"] == [["#02EB3C lime - the vase", "rgb(2, 235, 60)"],
                                      ["#FF6B6B salmon", "rgb(255, 107, 107)"],
                                      ["#1E3A5F dark slate blue", "rgb(30, 58, 95)"]]
    assert json.loads(result["prompt"]["text"]) == {"scene": 'a sunlit studio, "quoted"',
                                                    "color_palette": ["#02EB3C for the vase", "#FF6B6B", "#1E3A5F"]}
    # the token count is ComfyUI's status text; the preview repeats it only as a warning
    assert result["prompt"]["statusShown"] == "none"
    assert result["long"]["statusShown"] == "" and "WARNING: over 512" in result["long"]["status"]
    assert "flux2kit_preview" in result["widgets"]
    assert len(result["saved"]) == 12  # the preview is never saved as a widget value (widget.serialize = false)
