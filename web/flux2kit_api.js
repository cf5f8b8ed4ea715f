// flux2kit's FLUX.2 API Generate node in the browser: the API keys in ComfyUI's settings, the cost estimate on
// the node as soon as its inputs allow (and the cost of the last run), and which inputs the chosen model uses.
//
// Keys: ComfyUI stores settings in the user's comfy.settings.json (user/default/ on the server); the node reads
// the key from there when the environment variable (BFL_API_KEY, OXEN_API_KEY) is not set. A setting is not a
// node input, so the key never enters a workflow, a queued prompt or an image's metadata. Multi-user ComfyUI:
// the node cannot tell which user queued a prompt, so it reads environment variables only.
//
// Estimate: the price list and the model facts come from the server (GET /flux2kit/api_models, built from the
// provider classes the node runs); the arithmetic is ./lib/hosted.js (tested against the Python estimate).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

import { costText, estimateCost, estimateText, unusedApiInputs } from "./lib/hosted.js";
import { applyDisabled, chainMethod, growToFit, watchWidgets, widgetValues } from "./lib/widgets.js";

const NODE_TYPE = "Flux2KitAPIGenerate";
const WIDGET = "flux2kit_estimate";
const KEY_NOTE = " Stored in ComfyUI's user settings file (comfy.settings.json) on the server, readable by anyone " +
  "who can open this ComfyUI; the environment variable takes precedence. Never saved in workflows or images.";

let table = null; // the server's /flux2kit/api_models answer
let tableRequest = null;

function loadTable() {
  tableRequest ??= api.fetchApi("/flux2kit/api_models")
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .then((t) => { table = t; for (const n of app.graph?.nodes ?? []) if (n.type === NODE_TYPE) update(n, true); })
    .catch((e) => { console.warn("flux2kit: no price list from the server", e); tableRequest = null; });
  return tableRequest;
}

function referenceCount(node) {
  // the wired reference inputs (images.image_1, ...); a batch on one input counts once here, per image when sent
  return (node.inputs ?? []).filter((i) => /^images\./.test(i.name) && i.link != null).length;
}

function buildElement() {
  const root = document.createElement("div");
  root.className = "flux2kit-estimate";
  Object.assign(root.style, {
    fontSize: "11px", lineHeight: "15px", color: "var(--input-text, #ddd)", whiteSpace: "pre-wrap",
    overflowWrap: "break-word", padding: "2px 4px",
  });
  const estimate = document.createElement("div");
  const unused = document.createElement("div");
  unused.style.opacity = "0.75";
  const last = document.createElement("div");
  last.style.fontWeight = "bold";
  root.append(estimate, unused, last);
  return { root, estimate, unused, last };
}

function textHeight(node) {
  // the lines the three parts wrap to at the node's width (11px text: about 6.5 px a character)
  const perLine = Math.max(20, Math.floor((node.size[0] - 30) / 6.5));
  const { estimate, unused, last } = node.flux2kitEstimate;
  const lines = [estimate, unused, last].map((el) => el.textContent)
    .reduce((n, t) => n + (t ? Math.ceil(t.length / perLine) : 0), 0);
  return 15 * Math.max(1, lines) + 8;
}

function update(node, force = false) {
  const parts = node.flux2kitEstimate;
  if (!parts) return;
  const values = widgetValues(node);
  const refs = referenceCount(node);
  const key = JSON.stringify([values, refs, Boolean(table)]);
  if (!force && key === node.flux2kitEstimateKey) return;
  node.flux2kitEstimateKey = key;
  if (!table) {
    parts.estimate.textContent = "Estimate: loading the price list...";
    loadTable();
    return;
  }
  const model = values.model;
  const estimate = estimateCost(table, { ...values, references: refs });
  parts.estimate.textContent = estimateText(estimate);
  node.flux2kitEstimateValue = estimate;
  node.flux2kitUnused = model === undefined ? {} : unusedApiInputs(table, model, values.output_format);
  const names = Object.keys(node.flux2kitUnused);
  parts.unused.textContent = names.length ? `Not used by ${model}: ${names.join(", ")}.` : "";
  parts.unused.style.display = names.length ? "" : "none";
  // merged with the size rule of web/flux2kit_inputs.js, so neither undoes the other
  if (applyDisabled(node, { ...(node.flux2kitOverridden ?? {}), ...node.flux2kitUnused })) node.setDirtyCanvas?.(true, true);
  growToFit(node);
}

function showCost(node, output) {
  const text = costText(output);
  if (!text || !node.flux2kitEstimate) return;
  node.flux2kitEstimate.last.textContent = text;
  growToFit(node);
}

app.registerExtension({
  name: "flux2kit.api",
  settings: [
    {
      id: "Flux2Kit.API.BFLKey",
      category: ["flux2kit", "API keys", "Black Forest Labs"],
      name: "Black Forest Labs API key (FLUX.2 API Generate)",
      tooltip: "Key from dashboard.bfl.ai, used when BFL_API_KEY is not set." + KEY_NOTE,
      type: "text",
      defaultValue: "",
      attrs: { type: "password", autocomplete: "off" },
    },
    {
      id: "Flux2Kit.API.OxenKey",
      category: ["flux2kit", "API keys", "Oxen.ai"],
      name: "Oxen.ai API key (FLUX.2 API Generate)",
      tooltip: "Key from oxen.ai, used when OXEN_API_KEY is not set." + KEY_NOTE,
      type: "text",
      defaultValue: "",
      attrs: { type: "password", autocomplete: "off" },
    },
  ],
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const chain = (name, after) => chainMethod(nodeType.prototype, name, after);
    chain("onNodeCreated", function () {
      if (typeof this.addDOMWidget === "function") {
        this.flux2kitEstimate = buildElement();
        const widget = this.addDOMWidget(WIDGET, WIDGET, this.flux2kitEstimate.root, {
          serialize: false, // not in the prompt
          getMinHeight: () => textHeight(this),
        });
        if (widget) widget.serialize = false; // not in the workflow's widgets_values
      }
      watchWidgets(this, (node) => update(node));
      update(this);
    });
    chain("onConfigure", function () { update(this, true); });
    chain("onConnectionsChange", function () { update(this); });
    chain("onExecuted", function (output) { showCost(this, output); });
    chain("onDrawForeground", function () { update(this); }); // cheap when nothing changed (undo, paste, scripts)
  },
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      const node = /^\d+$/.test(id) ? app.graph?.getNodeById?.(Number(id)) : null;
      if (node?.type === NODE_TYPE) showCost(node, output);
    }
  },
});
