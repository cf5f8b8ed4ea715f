"""The extension in a real browser: headless Chromium on a real ComfyUI page (COMFYUI_PATH), asserting what the
page draws: visible heights of the previews, which widgets are shown, hidden or disabled, how often a message
appears, the cost estimate's text, the missing-folder notice, and that the shipped workflows keep their nodes
apart once they have run. Screenshots land in the test's tmp folder, for a person to look at."""

from __future__ import annotations

import json
import os
import urllib.parse

import pytest

from flux2kit.testing.browser import BINARY, Chromium, open_comfyui
from flux2kit.testing.hosted_api import ApiServer
from flux2kit.testing.real_comfyui import REPO

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout"),
    pytest.mark.skipif(BINARY is None, reason="no chromium: apt-get install chromium to test the extension in a browser"),
]

WORKFLOWS = REPO / "workflows"
KEY = "sk-browser-test-77aa55cc33-SECRET"


@pytest.fixture(scope="module")
def page(comfyui, tmp_path_factory):
    browser = Chromium(BINARY, str(tmp_path_factory.mktemp("chromium-profile")))
    try:
        open_comfyui(browser, comfyui)
        yield browser
    finally:
        browser.close()
    assert not [e for e in browser.errors if "flux2kit" in e], browser.errors


def load(page, name: str, **widgets):
    """Open workflows/<name> in the page, then set widgets: {node id: {widget: value}} (the callbacks run)."""
    data = json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))
    page.evaluate(f"""(async () => {{
      await window.comfyAPI.app.app.loadGraphData({json.dumps(data)});
      return true;
    }})()""")
    set_widgets(page, **widgets)


def set_widgets(page, **widgets):
    """Set widget values as a user would ({node id: {widget: value}}; the widgets' callbacks run)."""
    page.evaluate(f"""(async () => {{
      const app = window.comfyAPI.app.app;
      for (const [id, values] of Object.entries({json.dumps(widgets)})) {{
        const node = app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(values)) {{
          const w = node.widgets.find((w) => w.name === name);
          w.value = value;
          w.callback?.(value);
        }}
      }}
      app.canvas.setDirty(true, true);
      return true;
    }})()""")
    page.wait_for("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")


def shot(page, tmp_path, name):
    page.evaluate("(() => { const c = window.comfyAPI.app.app.canvas; c.setDirty(true, true); return true; })()")
    page.screenshot(tmp_path / f"{name}.png")


def demo_models(comfyui) -> dict:
    """Widget values that point the workflow's loaders at the demo models."""
    names = comfyui.model_names
    return {"1": {"model_name": names["transformer"]}, "2": {"text_encoder_name": names["text_encoder"]},
            "3": {"vae_name": names["vae"]}}


def run(page, comfyui, timeout=300):
    """Queue the page's graph as a user presses Run; wait until the server finished it."""
    before = len(comfyui.get_json("/history"))
    page.evaluate("(async () => { await window.comfyAPI.app.app.queuePrompt(0); return true; })()")
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = comfyui.get_json("/history")
        if len(history) > before:
            entry = list(history.values())[-1]
            if entry.get("status", {}).get("completed") is not None or entry.get("status", {}).get("status_str"):
                return entry
        time.sleep(0.5)
    pytest.fail("the run did not finish")


# What a node shows, measured in the page: its visible DOM widgets' boxes and texts, its widgets' states.
_NODE_JS = """((id) => {
  const node = window.comfyAPI.app.app.graph.getNodeById(id);
  const box = (el) => { if (!el) return null; const r = el.getBoundingClientRect();
    const shown = !!el.offsetParent && getComputedStyle(el).display !== "none" && r.height > 0;
    return { top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: r.height, shown,
             scrollHeight: el.scrollHeight, clientHeight: el.clientHeight, scrollWidth: el.scrollWidth,
             clientWidth: el.clientWidth, text: el.textContent }; };
  const widgets = node.widgets.map((w) => ({ name: w.name, hidden: !!w.hidden, disabled: !!w.computedDisabled,
    element: w.element ? box(w.element) : null, value: typeof w.value === "object" ? null : w.value }));
  const parts = node.flux2kitParts ? Object.fromEntries(["root", "status", "swatches", "text"].map(
    (k) => [k, box(node.flux2kitParts[k])])) : null;
  const chips = node.flux2kitParts ? [...node.flux2kitParts.swatches.children].map(box) : [];
  const estimate = node.flux2kitEstimate ? box(node.flux2kitEstimate.root) : null;
  return { type: node.type, size: [...node.size], widgets, parts, chips, estimate,
           missing: node.flux2kitMissing ?? null, notice: node.flux2kitNotice ? box(node.flux2kitNotice) : null,
           saved: node.serialize().widgets_values };
})"""


def node_view(page, node_id: int) -> dict:
    return page.evaluate(f"{_NODE_JS}({node_id})")


def visible_text(view) -> str:
    """Everything the node shows in DOM widgets (its canvas-drawn widgets hold no messages)."""
    return "\n".join(w["element"]["text"] for w in view["widgets"]
                     if w["element"] and w["element"]["shown"] and not w["hidden"])


_OVERLAPS_JS = """(() => {
  const g = window.comfyAPI.app.app.graph, T = LiteGraph.NODE_TITLE_HEIGHT;
  const rect = (n) => [n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  const hit = (a, b) => a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3];
  const found = [];
  for (const [i, a] of g.nodes.entries())
    for (const b of g.nodes.slice(i + 1)) if (hit(rect(a), rect(b))) found.push(`${a.title} / ${b.title}`);
  for (const group of g.groups ?? []) {
    const [x, y] = group.pos, w = group.size[0];
    for (const n of g.nodes) if (hit(rect(n), [x, y, x + w, y + group.titleHeight])) found.push(`${n.title} / ${group.title}`);
  }
  return found;
})()"""


# -- 6, 7, 8, 11: the JSON prompt and palette workflow -------------------------------------------------

def test_prompt_builder_previews_pickers_and_layout(page, comfyui, tmp_path):
    long_scene = "a very long description of a sunlit ceramics studio kitchen " * 50  # over 512 tokens
    load(page, "json_prompt_palette.json", **demo_models(comfyui),
         **{"10": {"width": 256, "height": 256, "num_inference_steps": 2}})
    # 8: the pickers beyond use_pickers are hidden (Scene palette uses 3, the typed Vase colour none)
    scene, vase = node_view(page, 4), node_view(page, 5)
    hidden = lambda view: sorted(w["name"] for w in view["widgets"] if w["hidden"] and w["name"][:6] in ("color_", "object"))  # noqa: E731
    assert hidden(scene) == ["color_4", "color_5", "object_4", "object_5"]
    assert hidden(vase) == [f"{k}_{i}" for k in ("color", "object") for i in range(1, 6)]
    assert vase["saved"][2:] == ["#02EB3C", "", "#FF6B6B", "", "#1E3A5F", "", "#F5F5DC", "", "#000000", ""]  # kept
    set_widgets(page, **{"4": {"use_pickers": 4}})  # one more picker: it shows again
    assert hidden(node_view(page, 4)) == ["color_5", "object_5"]
    set_widgets(page, **{"4": {"use_pickers": 3}})

    entry = run(page, comfyui)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    page.wait_for("!!window.comfyAPI.app.app.graph.getNodeById(9).flux2kitPreview")
    page.wait_for("new Promise((r) => setTimeout(() => r(true), 500))")
    shot(page, tmp_path, "json_prompt_palette_after_run")

    # 6: the JSON preview is readable (many lines, not two) and its status appears once
    prompt = node_view(page, 9)
    text = prompt["parts"]["text"]
    # (layout pixels: clientHeight is what the box shows at 100% zoom, whatever the canvas zoom)
    assert text["shown"] and text["clientHeight"] >= min(text["scrollHeight"], 16 * 15 + 10) - 2, text
    assert text["clientHeight"] >= 200, f"the preview shows {text['clientHeight']} px of text"
    assert visible_text(prompt).count("of 512 tokens") == 1, visible_text(prompt)
    # 7: the palette's swatches and status wrap inside the node: nothing cut, no word broken
    palette = node_view(page, 4)
    root = palette["parts"]["root"]
    assert len(palette["chips"]) == 3
    for chip in palette["chips"]:
        assert chip["shown"] and root["top"] <= chip["top"] and chip["bottom"] <= root["bottom"] + 0.5, (chip, root)
        assert chip["right"] <= root["right"] + 0.5
    status = palette["parts"]["status"]
    assert status["text"].startswith("the walls is color #F2E8CF") and status["bottom"] <= root["bottom"] + 0.5
    assert status["scrollWidth"] <= status["clientWidth"]
    assert visible_text(palette).count("the walls is color") == 1
    # 11: grown after the run, the nodes still keep apart
    assert page.evaluate(_OVERLAPS_JS) == []

    # 6: over 512 tokens, one warning (the preview's red status; ComfyUI's own status text stays hidden)
    set_widgets(page, **{"9": {"scene": long_scene}})
    entry = run(page, comfyui)
    assert entry["status"]["status_str"] == "success"
    page.wait_for("window.comfyAPI.app.app.graph.getNodeById(9).flux2kitPreview?.warning === true")
    page.wait_for("new Promise((r) => setTimeout(() => r(true), 500))")
    shot(page, tmp_path, "json_prompt_over_512")
    prompt = node_view(page, 9)
    assert visible_text(prompt).count("WARNING") == 1, visible_text(prompt)
    assert prompt["parts"]["status"]["shown"] and "WARNING: over 512" in prompt["parts"]["status"]["text"]


# -- 9: overridden inputs look inactive ----------------------------------------------------------------

def test_width_and_height_grey_out_aspect_ratio_and_resolution(page, comfyui):
    load(page, "generate_text_to_image.json")
    state = lambda: {w["name"]: w["disabled"] for w in node_view(page, 4)["widgets"]}  # noqa: E731
    assert not state()["aspect_ratio"] and not state()["resolution"]
    load(page, "generate_text_to_image.json", **{"4": {"width": 832, "height": 1216}})
    assert state()["aspect_ratio"] and state()["resolution"] and not state()["width"]
    saved = node_view(page, 4)["saved"]
    assert saved[1:3] == ["1:1", "1 MP"]  # greyed out, still saved
    set_widgets(page, **{"4": {"width": 0}})  # both or neither: aspect_ratio and resolution apply again
    assert not state()["aspect_ratio"] and not state()["resolution"]


# -- 5, 9, 10: the API node ------------------------------------------------------------------------------

def test_api_node_shows_its_estimate_which_inputs_apply_and_the_reported_cost(page, comfyui, tmp_path):
    load(page, "api_two_references.json")
    # 10: the example images are in the input folder: the LoadImage nodes show them
    page.wait_for("[1, 2].every((id) => window.comfyAPI.app.app.graph.getNodeById(id).imgs?.[0]?.naturalWidth === 256)")
    view = node_view(page, 3)
    assert view["estimate"]["shown"]
    assert view["estimate"]["text"].startswith("Estimate: $0.045-$0.060 for 1 image"), view["estimate"]["text"]
    assert "Not used by BFL flux-2-pro: num_inference_steps, guidance, output_quality." in view["estimate"]["text"]
    disabled = {w["name"] for w in view["widgets"] if w["disabled"]}
    assert disabled == {"num_inference_steps", "guidance", "output_quality"}
    shot(page, tmp_path, "api_estimate")

    load(page, "api_two_references.json", **{"3": {"model": "BFL flux-2-flex", "width": 1024, "height": 1024}})
    view = node_view(page, 3)
    disabled = {w["name"] for w in view["widgets"] if w["disabled"]}
    assert disabled == {"aspect_ratio", "resolution", "output_quality"}  # flex takes steps and guidance
    assert view["estimate"]["text"].startswith("Estimate: $0.100-$0.150 for 1 image, 1024x1024"), view["estimate"]["text"]

    load(page, "api_two_references.json", **{"3": {"model": "Oxen flux-2-pro"}})
    view = node_view(page, 3)
    assert "cost unknown: Oxen.ai lists no per-image price" in view["estimate"]["text"]
    assert not {w["name"] for w in view["widgets"] if w["disabled"]}

    # after a run: the cost the provider reported
    with ApiServer(key=KEY) as api:
        setting = urllib.parse.quote("Flux2Kit.API.BFLKey")
        comfyui.post_json(f"/settings/{setting}", KEY)
        try:
            load(page, "api_two_references.json", **{"3": {"base_url": api.url}})
            entry = run(page, comfyui, timeout=120)
        finally:
            comfyui.post_json(f"/settings/{setting}", "")
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        assert len(api.submissions()) == 1
    page.wait_for("window.comfyAPI.app.app.graph.getNodeById(3).flux2kitEstimate.last.textContent !== ''")
    view = node_view(page, 3)
    assert "Last run: 1 of 1 image, cost $0.045 (reported by Black Forest Labs)" in view["estimate"]["text"]
    shot(page, tmp_path, "api_after_run")


# -- 12: the missing text-encoder folder --------------------------------------------------------------

def test_a_missing_text_encoder_folder_is_flagged_before_a_run(page, comfyui, tmp_path):
    load(page, "generate_text_to_image.json")
    page.wait_for("!!window.comfyAPI.app.app.graph.getNodeById(2).flux2kitMissing")
    view = node_view(page, 2)
    notice = view["notice"]
    assert notice["shown"] and notice["bottom"] > notice["top"]
    text = notice["text"]
    assert "The text encoder folder 'FLUX.2-dev/' is missing. Put it in" in text
    assert f"{comfyui.models / 'text_encoders' / 'FLUX.2-dev'}/ holds config.json, the tokenizer files" in text
    assert view["saved"] == ["FLUX.2-dev/", "fp8 as stored", "FLUX.2 layers (encode only)"]  # the notice is not a saved widget
    shot(page, tmp_path, "missing_text_encoder")
    # the demo text encoder is there: no notice
    load(page, "generate_text_to_image.json", **{"2": {"text_encoder_name": comfyui.model_names["text_encoder"]}})
    page.wait_for("!window.comfyAPI.app.app.graph.getNodeById(2).flux2kitMissing")
    assert not node_view(page, 2)["notice"]["shown"]


def test_the_loader_refuses_a_missing_folder_when_queued(comfyui):
    """The same message when the prompt is queued (the API, or a frontend without flux2kit's extension)."""
    from flux2kit.testing.real_comfyui import ComfyUIError

    prompt = json.loads((WORKFLOWS / "api" / "generate_text_to_image.json").read_text(encoding="utf-8"))
    names = comfyui.model_names
    prompt["1"]["inputs"]["model_name"], prompt["3"]["inputs"]["vae_name"] = names["transformer"], names["vae"]
    with pytest.raises(ComfyUIError) as e:
        comfyui.queue(prompt)
    error = e.value.body["node_errors"]["2"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["input_name"] == "text_encoder_name"
    assert "The text encoder folder 'FLUX.2-dev/' is missing. Put it in" in error["details"]
    assert str(comfyui.models / "text_encoders") in error["details"]


# -- the previews on a graph built in the page (the first browser test) ------------------------------

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
                          comfyStatusHidden: n.widgets.filter((w) => w.name === "$$node-text-preview").every((w) => w.hidden),
                          chips: [...n.flux2kitParts.swatches.children]
                            .map((c) => [c.textContent, c.style.background]) });
  return { pal: parts(pal), prompt: parts(prompt), long: parts(long),
           widgets: pal.widgets.map((w) => w.name), saved: pal.serialize().widgets_values };
})()"""


def test_previews_show_on_the_nodes_in_a_real_browser(page, tmp_path):
    page.evaluate(_GRAPH_JS)
    result = page.wait_for(_RESULT_JS)
    page.wait_for("new Promise((r) => setTimeout(() => r(true), 500))")
    shot(page, tmp_path, "previews")
    assert result["pal"]["chips"] == [["#02EB3C lime - the vase", "rgb(2, 235, 60)"],
                                      ["#FF6B6B salmon", "rgb(255, 107, 107)"],
                                      ["#1E3A5F dark slate blue", "rgb(30, 58, 95)"]]
    assert json.loads(result["prompt"]["text"]) == {"scene": 'a sunlit studio, "quoted"',
                                                    "color_palette": ["#02EB3C for the vase", "#FF6B6B", "#1E3A5F"]}
    # the status shows in the preview, once: ComfyUI's own status-text widget is hidden on these nodes
    assert result["prompt"]["statusShown"] == "" and result["prompt"]["status"].endswith("of 512 tokens (estimate)")
    assert result["prompt"]["comfyStatusHidden"] and result["long"]["comfyStatusHidden"]
    assert result["long"]["statusShown"] == "" and "WARNING: over 512" in result["long"]["status"]
    assert "flux2kit_preview" in result["widgets"]
    assert len(result["saved"]) == 12  # the preview is never saved as a widget value (widget.serialize = false)
