// flux2kit prompt builders in the browser: the readable prompt, its token status and the colour swatches,
// drawn on the node after it runs. The logic is in ./lib/preview.js (pure, tested with node --test web/tests);
// this file only touches ComfyUI's public extension API (app.registerExtension, node.addDOMWidget).
import { app } from "../../scripts/app.js";

import { PREVIEW_NODE_TYPES, previewModel, rootNodeId, swatchLayout } from "./lib/preview.js";

const WIDGET = "flux2kit_preview";

function buildElement() {
  const root = document.createElement("div");
  root.className = "flux2kit-preview";
  Object.assign(root.style, {
    display: "flex", flexDirection: "column", gap: "4px", overflow: "hidden", fontSize: "11px",
    color: "var(--input-text, #ddd)",
  });
  const status = document.createElement("div");
  const swatches = document.createElement("div");
  Object.assign(swatches.style, { display: "flex", flexWrap: "wrap", gap: "4px" });
  const text = document.createElement("pre");
  Object.assign(text.style, {
    margin: "0", padding: "4px", overflow: "auto", flex: "1 1 auto", whiteSpace: "pre-wrap", wordBreak: "break-word",
    fontFamily: "monospace", background: "var(--comfy-input-bg, #222)", borderRadius: "4px",
  });
  root.append(status, swatches, text);
  return { root, status, swatches, text };
}

function render(parts, model) {
  // The token count also shows as the node's status text (ComfyUI's progress text): repeat it only as a warning.
  parts.status.textContent = model?.warning ? model.status : "";
  Object.assign(parts.status.style, { color: "#ff6b6b", fontWeight: "bold", display: model?.warning ? "" : "none" });
  parts.swatches.replaceChildren(...(model?.colors ?? []).map((c) => {
    const chip = document.createElement("span");
    chip.textContent = c.label;
    chip.title = c.label;
    Object.assign(chip.style, {
      background: c.hex, color: c.ink, padding: "3px 6px", borderRadius: "3px", border: "1px solid #0006",
      whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", maxWidth: "100%",
    });
    return chip;
  }));
  parts.text.textContent = model?.text ?? "";
  parts.text.style.display = model?.text ? "" : "none";
}

function drawFallback(node, ctx) {
  // Without DOM widgets (an old frontend): the status line and the swatches, drawn under the widgets.
  const model = node.flux2kitPreview;
  if (!model || node.flags?.collapsed) return;
  const top = node.size[1] - 40;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = model.warning ? "#ff6b6b" : "#aaa";
  ctx.fillText(model.status, 8, top);
  for (const [i, r] of swatchLayout(model.colors.length, node.size[0] - 16, { height: 16 }).entries()) {
    const c = model.colors[i];
    ctx.fillStyle = c.hex;
    ctx.fillRect(8 + r.x, top + 6 + r.y, r.w, r.h);
    ctx.fillStyle = c.ink;
    ctx.fillText(c.hex, 12 + r.x, top + 18 + r.y);
  }
  ctx.restore();
}

function showPreview(node, output) {
  const model = previewModel(output);
  if (!model) return;
  node.flux2kitPreview = model;
  if (node.flux2kitParts) render(node.flux2kitParts, model);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "flux2kit.promptPreviews",
  // Outputs also arrive here (a run, or a workflow reopened with its outputs); onExecuted alone misses some.
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      const node = app.graph?.getNodeById?.(rootNodeId(id));
      if (node && PREVIEW_NODE_TYPES.includes(node.type)) showPreview(node, output);
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!PREVIEW_NODE_TYPES.includes(nodeData?.name)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (typeof this.addDOMWidget === "function") {
        this.flux2kitParts = buildElement();
        const widget = this.addDOMWidget(WIDGET, WIDGET, this.flux2kitParts.root, {
          serialize: false, // options.serialize: left out of the prompt sent to the server
          getMinHeight: () => (this.flux2kitPreview?.text ? 140 : 40),
        });
        // widget.serialize: left out of the workflow's widgets_values (options.serialize alone saves "" there)
        if (widget) widget.serialize = false;
        render(this.flux2kitParts, null);
      }
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      showPreview(this, output);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (!this.flux2kitParts) drawFallback(this, ctx);
      return result;
    };
  },
});
