// Which inputs of a flux2kit node apply, from its widget values (pure, no DOM): the extension
// (web/flux2kit_inputs.js) greys out the ones that do not and hides the colour pickers a palette does not use.
// Tested with `node --test web/tests`; tests/nodes/test_web.py checks the rules against the Python nodes.

/** Nodes with the shared size inputs (nodes/sampling.py generation_inputs). */
export const SIZE_NODE_TYPES = ["Flux2KitGenerate", "Flux2KitSampler", "Flux2KitAPIGenerate"];
export const PALETTE_NODE_TYPE = "Flux2KitHexPalette";
export const PICKERS = 5; // nodes/prompts.py PICKERS

/** {input name: why it does not apply} for a node's values ({name: value}; undefined = linked, unknown). */
export function overriddenInputs(nodeType, values) {
  const out = {};
  if (SIZE_NODE_TYPES.includes(nodeType)) {
    const { width, height } = values;
    if (width && height) {
      out.aspect_ratio = `width x height (${width}x${height}) sets the size`;
      out.resolution = `width x height (${width}x${height}) sets the size`;
    }
  }
  return out;
}

/** The palette node's widgets to hide: the pickers (colour and object) beyond use_pickers. */
export function unusedPickers(nodeType, values) {
  if (nodeType !== PALETTE_NODE_TYPE) return [];
  const used = Number.isInteger(values.use_pickers) ? values.use_pickers : PICKERS; // linked: show them all
  const hidden = [];
  for (let i = used + 1; i <= PICKERS; i++) hidden.push(`color_${i}`, `object_${i}`);
  return hidden;
}

// ComfyUI's frontend flags a missing model only when its name ends like a model file (its own list of
// extensions); a folder choice such as "FLUX.2-dev/" is never checked there, so flux2kit checks those.
const MODEL_EXTENSIONS = [".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf"];

/** The loaders whose choice the extension checks, and the widget that holds it (nodes/loaders.py MODEL_INPUTS). */
export const MODEL_WIDGETS = {
  Flux2KitTransformerLoader: "model_name",
  Flux2KitTextEncoderLoader: "text_encoder_name",
  Flux2KitVAELoader: "vae_name",
};

/** True when the choice is not in the loader's list and the frontend's own check would not see it. */
export function needsFolderCheck(value, options) {
  if (typeof value !== "string" || !value.trim()) return false;
  if (Array.isArray(options) && options.includes(value)) return false;
  const lower = value.toLowerCase();
  return !MODEL_EXTENSIONS.some((ext) => lower.endsWith(ext));
}
