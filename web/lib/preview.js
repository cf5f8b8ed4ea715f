// Pure functions behind the prompt-builder previews (no DOM, no ComfyUI): tested with `node --test web/tests`.
//
// The Python nodes send their preview in the "executed" message's output:
//   flux2kit_preview: [text]        the readable prompt (indented JSON) or the colour fragment
//   flux2kit_status:  [text]        the token count line
//   flux2kit_warning: [bool]        true when the prompt is over the text encoder's 512 tokens
//   flux2kit_colors:  [{hex, name, object}]

const HEX_DIGITS = /^[0-9a-fA-F]+$/;

/** "#abc" / "02eb3c" / "#02EB3CFF" -> "#02EB3C"; anything else -> null (mirrors pipelines/palette.py). */
export function normalizeHex(text) {
  if (typeof text !== "string") return null;
  let digits = text.trim();
  if (digits.startsWith("#")) digits = digits.slice(1);
  if (!digits || !HEX_DIGITS.test(digits)) return null;
  if (digits.length === 3) digits = [...digits].map((c) => c + c).join("");
  else if (digits.length === 8 && digits.slice(6).toUpperCase() === "FF") digits = digits.slice(0, 6);
  else if (digits.length !== 6) return null;
  return "#" + digits.toUpperCase();
}

/** Black or white text, whichever reads better on the colour (WCAG relative luminance, as the swatch image). */
export function readableInk(hex) {
  const h = normalizeHex(hex);
  if (!h) return "#000000";
  const channel = (i) => {
    const c = parseInt(h.slice(i, i + 2), 16) / 255;
    return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  };
  const luminance = 0.2126 * channel(1) + 0.7152 * channel(3) + 0.0722 * channel(5);
  return luminance > 0.179 ? "#000000" : "#FFFFFF";
}

/** One swatch's label: "#02EB3C lime - the vase". */
export function swatchLabel(color) {
  const parts = [color.hex, color.name].filter(Boolean).join(" ");
  return color.object ? `${parts} - ${color.object}` : parts;
}

function last(list) {
  return Array.isArray(list) && list.length ? list[list.length - 1] : undefined;
}

/** Limit a preview to maxLines lines (the node stays a sensible size); says how many were left out. */
export function clampLines(text, maxLines = 40) {
  const lines = String(text ?? "").split("\n");
  if (lines.length <= maxLines) return lines.join("\n");
  const hidden = lines.length - maxLines;
  return [...lines.slice(0, maxLines), `... ${hidden} more line${hidden === 1 ? "" : "s"}`].join("\n");
}

/**
 * The preview to draw for a node's "executed" output, or null when the output carries none.
 * Colours with an invalid HEX code are dropped (they never come from flux2kit, but outputs are data).
 */
export function previewModel(output, { maxLines = 40 } = {}) {
  if (!output || typeof output !== "object") return null;
  const text = last(output.flux2kit_preview);
  const status = last(output.flux2kit_status);
  const warning = last(output.flux2kit_warning) === true;
  const colors = (Array.isArray(output.flux2kit_colors) ? output.flux2kit_colors : [])
    .filter((c) => c && typeof c === "object")
    .map((c) => ({ hex: normalizeHex(c.hex), name: String(c.name ?? ""), object: String(c.object ?? "") }))
    .filter((c) => c.hex)
    .map((c) => ({ ...c, ink: readableInk(c.hex), label: swatchLabel(c) }));
  if (text === undefined && status === undefined && !colors.length) return null;
  return {
    text: text === undefined ? "" : clampLines(text, maxLines),
    status: status === undefined ? "" : String(status),
    warning,
    colors,
  };
}

/** Swatch rectangles for drawing on a canvas: as many per row as fit in `width`, wrapping. */
export function swatchLayout(count, width, { minWidth = 72, height = 28, gap = 4 } = {}) {
  if (count <= 0 || width <= 0) return [];
  const perRow = Math.max(1, Math.min(count, Math.floor((width + gap) / (minWidth + gap))));
  const w = (width - gap * (perRow - 1)) / perRow;
  return Array.from({ length: count }, (_, i) => ({
    x: (i % perRow) * (w + gap),
    y: Math.floor(i / perRow) * (height + gap),
    w,
    h: height,
  }));
}

/**
 * The height (px) the preview needs at a given width, so the node can grow to show it: the status line(s),
 * the swatch rows and the prompt text up to maxTextLines (longer text scrolls inside that). Character widths
 * are estimated (monospace text, 11px labels); the extension also measures the drawn element and takes the
 * larger of the two.
 */
export function previewHeight(model, width, { charWidth = 6.7, lineHeight = 15, maxTextLines = 16, gap = 4 } = {}) {
  if (!model) return 0;
  const inner = Math.max(40, width - 8);
  const wrapped = (text) => String(text).split("\n")
    .reduce((n, line) => n + Math.max(1, Math.ceil((line.length * charWidth) / inner)), 0);
  let height = 0;
  const parts = [];
  if (model.status) parts.push(wrapped(model.status) * lineHeight);
  if (model.colors.length) {
    // chips wrap like inline boxes: label width + padding, as many per row as fit
    let rows = 1, used = 0;
    for (const c of model.colors) {
      const w = Math.min(inner, c.label.length * charWidth + 16);
      if (used && used + gap + w > inner) { rows += 1; used = w; } else used += (used ? gap : 0) + w;
    }
    parts.push(rows * (lineHeight + 8) + (rows - 1) * gap);
  }
  if (model.text) parts.push(Math.min(wrapped(model.text), maxTextLines) * lineHeight + 10);
  height = parts.reduce((a, b) => a + b, 0) + gap * Math.max(0, parts.length - 1);
  return Math.ceil(height);
}

/** ComfyUI's own status-text widget (the progress_text channel): the preview shows that text itself, once. */
export const STATUS_TEXT_WIDGET = "$$node-text-preview";

/** The flux2kit nodes that send a preview (tests/nodes/test_web.py checks this list against the Python nodes). */
export const PREVIEW_NODE_TYPES = [
  "Flux2KitHexPalette",
  "Flux2KitPaletteFromImage",
  "Flux2KitJSONSubject",
  "Flux2KitJSONText",
  "Flux2KitJSONPrompt",
  "Flux2KitJSONPromptParse",
  "Flux2KitPromptUpsample",
];

/** The root-graph node id (a number, as LiteGraph stores it) of an execution id like "12"; null for a node
 *  inside a subgraph ("12:5"), whose preview then comes through onExecuted only. */
export function rootNodeId(executionId) {
  const text = String(executionId ?? "");
  return /^\d+$/.test(text) ? Number(text) : null;
}
