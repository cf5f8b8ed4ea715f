// node --test web/tests
import assert from "node:assert/strict";
import { test } from "node:test";

import { needsFolderCheck, overriddenInputs, unusedPickers } from "../lib/inputs.js";
import { applyDisabled, applyHidden, watchWidgets, widgetValues } from "../lib/widgets.js";

test("width and height set the size: aspect_ratio and resolution do not apply", () => {
  for (const type of ["Flux2KitGenerate", "Flux2KitSampler", "Flux2KitAPIGenerate"]) {
    assert.deepEqual(Object.keys(overriddenInputs(type, { width: 512, height: 768 })), ["aspect_ratio", "resolution"]);
    assert.deepEqual(overriddenInputs(type, { width: 512, height: 0 }), {}); // both or neither
    assert.deepEqual(overriddenInputs(type, { width: undefined, height: 768 }), {}); // linked: unknown
  }
  assert.match(overriddenInputs("Flux2KitGenerate", { width: 512, height: 768 }).aspect_ratio, /512x768/);
  assert.deepEqual(overriddenInputs("Flux2KitTextEncode", { width: 512, height: 768 }), {});
});

test("the palette hides the pickers beyond use_pickers", () => {
  assert.deepEqual(unusedPickers("Flux2KitHexPalette", { use_pickers: 3 }), ["color_4", "object_4", "color_5", "object_5"]);
  assert.equal(unusedPickers("Flux2KitHexPalette", { use_pickers: 0 }).length, 10);
  assert.deepEqual(unusedPickers("Flux2KitHexPalette", { use_pickers: 5 }), []);
  assert.deepEqual(unusedPickers("Flux2KitHexPalette", { use_pickers: undefined }), []); // linked: all shown
  assert.deepEqual(unusedPickers("Flux2KitJSONPrompt", { use_pickers: 0 }), []);
});

test("folders are checked by flux2kit, model files by the frontend", () => {
  assert.equal(needsFolderCheck("FLUX.2-dev/", ["other/"]), true);
  assert.equal(needsFolderCheck("FLUX.2-dev/", ["FLUX.2-dev/"]), false);
  assert.equal(needsFolderCheck("flux2-vae.safetensors", []), false);
  assert.equal(needsFolderCheck("model.GGUF", []), false);
  assert.equal(needsFolderCheck("", []), false);
});

function fakeNode() {
  const widgets = ["aspect_ratio", "resolution", "width"].map((name) => ({ name, value: 1, callback: null }));
  return { widgets, inputs: [{ name: "width", widget: { name: "width" }, link: 7 }] };
}

test("widget helpers: values (linked = undefined), disable and re-enable only what flux2kit disabled", () => {
  const node = fakeNode();
  assert.deepEqual(widgetValues(node), { aspect_ratio: 1, resolution: 1, width: undefined });
  node.widgets[2].disabled = true; // disabled by someone else
  assert.equal(applyDisabled(node, { aspect_ratio: "why" }), true);
  assert.equal(node.widgets[0].disabled, true);
  assert.equal(applyDisabled(node, { aspect_ratio: "why" }), false);
  assert.equal(applyDisabled(node, {}), true);
  assert.equal(node.widgets[0].disabled, false);
  assert.equal(node.widgets[2].disabled, true); // untouched
  assert.equal(applyHidden(node, ["resolution"]), true);
  assert.equal(node.widgets[1].hidden, true);
  assert.equal(applyHidden(node, []), true);
  assert.equal(node.widgets[1].hidden, false);
  let seen = 0;
  watchWidgets(node, () => { seen += 1; });
  watchWidgets(node, () => { seen += 100; }); // once per widget
  node.widgets[0].callback(2);
  assert.equal(seen, 1);
});
