// flux2kit prompt builders in the browser: the readable prompt, its token status and the colour swatches,
// drawn on the node after it runs. The logic is in ./lib/preview.js (pure, tested with node --test web/tests);
// this file only touches ComfyUI's public extension API (app.registerExtension, node.addDOMWidget, widgets).
import { app } from "../../scripts/app.js";

import {
  PREVIEW_NODE_TYPES, STATUS_TEXT_WIDGET, previewHeight, previewModel, rootNodeId, swatchLayout,
} from "./lib/preview.js";

const WIDGET = "flux2kit_preview";
const MAX_TEXT_LINES = 16; // longer previews scroll inside this height

function buildElement() {
  const root = document.createElement("div");
  root.className = "flux2kit-preview";
  Object.assign(root.style, {
    display: "flex", flexDirection: "column", gap: "4px", overflow: "hidden", fontSize: "11px", lineHeight: "15px",
    color: "var(--input-text, #ddd)", boxSizing: "border-box",
  });
  const status = document.createElement("div");
  // wrap between words; only a word longer than the line (a long HEX run) may break
  Object.assign(status.style, { whiteSpace: "pre-wrap", overflowWrap: "break-word", wordBreak: "normal", flex: "0 0 auto" });
  const swatches = document.createElement("div");
  Object.assign(swatches.style, { display: "flex", flexWrap: "wrap", gap: "4px", flex: "0 0 auto" });
  const text = document.createElement("pre");
  Object.assign(text.style, {
    margin: "0", padding: "4px", overflow: "auto", flex: "1 1 auto", minHeight: "0", whiteSpace: "pre-wrap",
    overflowWrap: "break-word", fontFamily: "monospace", fontSize: "11px", lineHeight: "15px",
    background: "var(--comfy-input-bg, #222)", borderRadius: "4px",
  });
  root.append(status, swatches, text);
  return { root, status, swatches, text };
}

function render(parts, model) {
  // The status (token count, or the palette's prompt fragment) shows here, once: ComfyUI's own status-text
  // widget on these nodes is hidden (hideStatusText), and a warning is drawn in red.
  parts.status.textContent = model?.status ?? "";
  Object.assign(parts.status.style, {
    color: model?.warning ? "#ff6b6b" : "", fontWeight: model?.warning ? "bold" : "",
    display: model?.status ? "" : "none",
  });
  parts.swatches.replaceChildren(...(model?.colors ?? []).map((c) => {
    const chip = document.createElement("span");
    chip.textContent = c.label;
    chip.title = c.label;
    Object.assign(chip.style, {
      background: c.hex, color: c.ink, padding: "3px 6px", borderRadius: "3px", border: "1px solid #0006",
      whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", maxWidth: "100%", boxSizing: "border-box",
    });
    return chip;
  }));
  parts.swatches.style.display = model?.colors?.length ? "flex" : "none";
  parts.text.textContent = model?.text ?? "";
  parts.text.style.display = model?.text ? "" : "none";
}

function hideStatusText(node) {
  const widget = node.widgets?.find((w) => w.name === STATUS_TEXT_WIDGET);
  if (widget && !widget.hidden) {
    widget.hidden = true;
    node.setDirtyCanvas?.(true, true);
  }
}

function measuredHeight(parts) {
  // what the drawn parts need (0 when the element is not laid out, e.g. the node is off screen)
  const { status, swatches, text } = parts;
  if (!parts.root.isConnected || !parts.root.offsetParent) return 0;
  const shown = [status, swatches, text].filter((el) => el.style.display !== "none");
  const lineCap = MAX_TEXT_LINES * 15 + 10;
  const heights = shown.map((el) => (el === text ? Math.min(el.scrollHeight, lineCap) : el.scrollHeight));
  return heights.reduce((a, b) => a + b, 0) + 4 * Math.max(0, shown.length - 1);
}

function fitPreview(node) {
  // The preview needs its room: the node grows (never shrinks) until the swatches, the status and up to
  // MAX_TEXT_LINES of the prompt are visible; longer prompts scroll inside the preview.
  const parts = node.flux2kitParts;
  if (!parts) return;
  const wanted = Math.max(previewHeight(node.flux2kitPreview, node.size[0] - 20, { maxTextLines: MAX_TEXT_LINES }),
                          measuredHeight(parts));
  if (wanted > (node.flux2kitMinHeight ?? 0)) node.flux2kitMinHeight = wanted;
  const need = node.computeSize?.()[1];
  if (need && node.size[1] < need) node.setSize([node.size[0], need]);
  node.setDirtyCanvas?.(true, true);
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
  if (node.flux2kitParts) {
    render(node.flux2kitParts, model);
    hideStatusText(node);
    fitPreview(node);
    // measure again once the browser has laid the new content out
    requestAnimationFrame(() => requestAnimationFrame(() => fitPreview(node)));
  }
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
          getMinHeight: () => (this.flux2kitPreview ? Math.max(40, this.flux2kitMinHeight ?? 0) : 40),
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
      else if (this.flux2kitPreview) hideStatusText(this); // ComfyUI adds it on each run's first status text
      return result;
    };
  },
});
