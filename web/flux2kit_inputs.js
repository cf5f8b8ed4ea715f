// Which inputs apply, shown on the nodes: with width and height set, aspect_ratio and resolution are greyed out
// (disabled, as the frontend shows an input a link overrides); the HEX palette hides the colour pickers beyond
// use_pickers (their values stay in the saved workflow); a loader whose folder is missing is outlined in red
// with the loader's own message saying where to put it (the frontend's model check sees only file names).
// Rules: ./lib/inputs.js (pure, tested with node --test web/tests).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

import { MODEL_WIDGETS, SIZE_NODE_TYPES, PALETTE_NODE_TYPE, needsFolderCheck, overriddenInputs, unusedPickers }
  from "./lib/inputs.js";
import { applyDisabled, applyHidden, chainMethod, growToFit, watchWidgets, widgetValues } from "./lib/widgets.js";

const NOTICE = "flux2kit_notice";
const ERROR_COLOUR = "#ff4444";

function refresh(node) {
  const values = widgetValues(node);
  const key = JSON.stringify(values);
  if (key === node.flux2kitInputsKey) return;
  node.flux2kitInputsKey = key;
  let changed = false;
  if (SIZE_NODE_TYPES.includes(node.type)) {
    node.flux2kitOverridden = overriddenInputs(node.type, values);
    // the API node's unused inputs (web/flux2kit_api.js) are merged in, so neither rule undoes the other
    changed = applyDisabled(node, { ...node.flux2kitOverridden, ...(node.flux2kitUnused ?? {}) }) || changed;
  }
  if (node.type === PALETTE_NODE_TYPE) changed = applyHidden(node, unusedPickers(node.type, values)) || changed;
  if (MODEL_WIDGETS[node.type]) checkModelFolder(node);
  if (changed) growToFit(node);
}

// -- missing model folders -------------------------------------------------------------------------

function noticeElement(node) {
  if (node.flux2kitNotice || typeof node.addDOMWidget !== "function") return node.flux2kitNotice;
  const el = document.createElement("div");
  Object.assign(el.style, {
    color: ERROR_COLOUR, fontSize: "11px", lineHeight: "15px", whiteSpace: "pre-wrap", overflowWrap: "break-word",
    display: "none",
  });
  const widget = node.addDOMWidget(NOTICE, NOTICE, el, {
    serialize: false,
    getMinHeight: () => (node.flux2kitMissing ? 15 * Math.ceil(node.flux2kitMissing.length / 48) + 8 : 0),
  });
  if (widget) {
    widget.serialize = false; // never in widgets_values
    widget.hidden = true;
    node.flux2kitNoticeWidget = widget;
  }
  node.flux2kitNotice = el;
  return el;
}

function showMissing(node, problem) {
  // the node grows for the notice and gets its size back once the folder is there (or another is picked)
  if (problem && !node.flux2kitMissing) node.flux2kitSizeBeforeNotice = [...node.size];
  const before = !problem && node.flux2kitMissing ? node.flux2kitSizeBeforeNotice : null;
  node.flux2kitMissing = problem || null;
  const el = noticeElement(node);
  if (el) {
    el.textContent = problem || "";
    el.style.display = problem ? "" : "none";
  }
  if (node.flux2kitNoticeWidget) node.flux2kitNoticeWidget.hidden = !problem;
  if (problem) growToFit(node);
  else if (before) node.setSize([node.size[0], Math.max(before[1], node.computeSize?.()[1] ?? 0)]);
  node.setDirtyCanvas?.(true, true);
}

async function checkModelFolder(node) {
  const widget = node.widgets?.find((w) => w.name === MODEL_WIDGETS[node.type]);
  const value = widget?.value;
  if (!needsFolderCheck(value, widget?.options?.values)) {
    if (node.flux2kitMissing) showMissing(node, null);
    return;
  }
  try {
    const answer = await api.fetchApi(`/flux2kit/missing_model?node=${encodeURIComponent(node.type)}` +
                                      `&value=${encodeURIComponent(value)}`);
    const { problem } = await answer.json();
    if (widget.value !== value) return; // changed while asking
    showMissing(node, problem);
    if (problem && !node.flux2kitToasted) {
      node.flux2kitToasted = true;
      app.extensionManager?.toast?.add?.({ severity: "error", summary: `${node.title}: missing folder`, detail: problem,
                                          life: 15000 });
    }
  } catch (e) {
    console.warn("flux2kit: could not check the model folder", e);
  }
}

// -- wiring ----------------------------------------------------------------------------------------

const HANDLED = [...SIZE_NODE_TYPES, PALETTE_NODE_TYPE, ...Object.keys(MODEL_WIDGETS)];

app.registerExtension({
  name: "flux2kit.inputs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!HANDLED.includes(nodeData?.name)) return;
    const chain = (name, after) => chainMethod(nodeType.prototype, name, after);
    chain("onNodeCreated", function () {
      watchWidgets(this, refresh);
      refresh(this);
    });
    chain("onConfigure", function () { this.flux2kitInputsKey = null; refresh(this); });
    chain("onConnectionsChange", function () { refresh(this); });
    // the canvas draws often: a cheap check (same values, nothing to do) keeps undo, paste and scripted edits right
    chain("onDrawForeground", function (ctx) {
      refresh(this);
      if (this.flux2kitMissing && !this.flags?.collapsed) {
        // the outline ComfyUI draws for a missing model file, for a missing folder
        ctx.save();
        ctx.strokeStyle = ERROR_COLOUR;
        ctx.lineWidth = 6;
        const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        ctx.strokeRect(-6, -title - 6, this.size[0] + 12, this.size[1] + title + 12);
        ctx.restore();
      }
    });
  },
});
