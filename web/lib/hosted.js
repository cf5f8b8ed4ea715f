// Pure functions behind the FLUX.2 API node's cost estimate (no DOM, no ComfyUI): tested with `node --test web/tests`.
//
// The facts come from the server (GET /flux2kit/api_models, built by nodes/api.py browser_table() from the same
// provider classes the node runs), so the price list is written once, in Python:
//   { models: { "BFL flux-2-pro": { provider, price: [first MP, each further MP] | null, exact_size,
//                                   takes_steps_and_guidance, quality_formats, max_references,
//                                   reference_pixels, single_reference_pixels, resolutions } },
//     size: { megapixel, resolutions: { "1 MP": 1.0, ... }, multiple, min_side, max_side, max_pixels } }

/** (width, height) for an aspect ratio and a resolution: pipelines/parameters.py size_from_aspect, step for step. */
export function sizeFromAspect(size, aspectRatio, resolution, firstImage = null) {
  const mp = size.resolutions[resolution];
  if (mp === undefined) return null;
  let ratio;
  if (aspectRatio === "match_input_image") {
    if (!firstImage) return null;
    ratio = firstImage[0] / firstImage[1];
  } else {
    const [a, b] = String(aspectRatio).split(":").map(Number);
    if (!(a > 0 && b > 0)) return null;
    ratio = a / b;
  }
  const pixels = mp * size.megapixel;
  const m = size.multiple;
  // Python's round() rounds halves to even; the values here are never exact halves of 16 in practice,
  // but round the same way so both sides agree on every input
  const snap = (v) => m * roundHalfEven(v / m);
  let width = Math.min(Math.max(snap(Math.sqrt(pixels * ratio)), size.min_side), size.max_side);
  let height = Math.min(Math.max(snap(Math.sqrt(pixels / ratio)), size.min_side), size.max_side);
  while (width * height > size.max_pixels) {
    if (width >= height) width -= m;
    else height -= m;
  }
  return [width, height];
}

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function ceilMp(pixels, megapixel) {
  return Math.max(1, Math.ceil(pixels / megapixel - 1e-9));
}

/**
 * The estimate for the node's inputs, or why there is none.
 * inputs: { model, aspect_ratio, resolution, width, height, batch_size, references } where references is the
 * number of wired reference inputs (their sizes are unknown before the run) and a value is `undefined` when its
 * input is linked to another node (known only when the graph runs).
 * Returns { known: bool, low, high, images, size: [w, h] | null, note } in USD for the whole batch.
 */
export function estimateCost(table, inputs) {
  const facts = table?.models?.[inputs.model];
  if (!facts) return { known: false, note: "unknown model" };
  const images = inputs.batch_size;
  if (!facts.price) {
    const why = facts.provider === "Oxen.ai" ? "Oxen.ai lists no per-image price" : "not on the price list";
    return { known: false, images, note: `cost unknown: ${why}; ${facts.provider} reports usage after the run` };
  }
  if (!Number.isInteger(images)) return { known: false, note: "batch_size comes from another node" };
  const size = table.size;
  const refs = inputs.references ?? 0;
  const [first, extra] = facts.price;
  // the output size: width x height when both are set, else the aspect ratio at the resolution
  let outLow, outHigh, shape = null, about = false;
  const { width, height } = inputs;
  if (width === undefined || height === undefined) return { known: false, note: "the size comes from another node" };
  if (Boolean(width) !== Boolean(height)) return { known: false, note: "set both width and height, or neither" };
  if (width && height) {
    shape = [width, height];
  } else if (inputs.aspect_ratio === "match_input_image" && refs > 0) {
    about = true; // image 1's shape sets the size: the resolution's megapixels are close, not exact
  } else {
    shape = sizeFromAspect(size, inputs.aspect_ratio, inputs.resolution);
    if (!shape) return { known: false, note: "pick an aspect ratio (match_input_image needs image 1)" };
  }
  if (shape) {
    outLow = outHigh = ceilMp(shape[0] * shape[1], size.megapixel);
  } else {
    const mp = size.resolutions[inputs.resolution] ?? 1;
    outLow = outHigh = ceilMp(mp * size.megapixel, size.megapixel);
  }
  // references are billed by their megapixels (rounded up, all together): at least 1, at most 1 MP each when
  // several are sent, 4 MP for a lone one (they are downscaled to that before sending)
  let inLow = 0, inHigh = 0;
  if (refs > 0) {
    inLow = 1;
    inHigh = refs === 1 ? Math.round(facts.single_reference_pixels / size.megapixel)
      : Math.min(refs, facts.max_references) * Math.round(facts.reference_pixels / size.megapixel);
  }
  const each = (out, inp) => first + extra * (out - 1) + extra * inp;
  return {
    known: true,
    low: images * each(outLow, inLow),
    high: images * each(outHigh, inHigh),
    images,
    size: shape,
    about,
    note: `${facts.provider} price list: $${first} first MP + $${extra} per further output or input MP`,
  };
}

export function money(usd) {
  return `$${usd.toFixed(3)}`;
}

/** The line the node shows before a run. */
export function estimateText(estimate) {
  if (!estimate.known) return `Estimate: ${estimate.note}.`;
  const n = `${estimate.images} image${estimate.images === 1 ? "" : "s"}`;
  const size = estimate.size ? `, ${estimate.size[0]}x${estimate.size[1]}` : "";
  const amount = estimate.low === estimate.high ? money(estimate.low)
    : `${money(estimate.low)}-${money(estimate.high)}`;
  const notes = [];
  if (estimate.low !== estimate.high) notes.push("the references' size counts, read when sent");
  if (estimate.about) notes.push("image 1's shape sets the output size");
  const why = notes.length ? ` (${notes.join("; ")})` : "";
  return `Estimate: ${amount} for ${n}${size}${why}. ${estimate.note}.`;
}

/** The line the node shows after a run, from its "executed" output (flux2kit_cost). */
export function costText(output) {
  const list = output?.flux2kit_cost;
  const cost = Array.isArray(list) && list.length ? list[list.length - 1] : null;
  if (!cost || typeof cost !== "object") return null;
  const n = `${cost.images} of ${cost.requested} image${cost.requested === 1 ? "" : "s"}`;
  if (typeof cost.usd !== "number") return `Last run: ${n}, cost unknown (see the provider's usage log)`;
  return `Last run: ${n}, cost ${money(cost.usd)} (${cost.how})`;
}

/** Inputs of the API node that the chosen model does not use, with why (shown disabled on the node). */
export function unusedApiInputs(table, model, outputFormat) {
  const facts = table?.models?.[model];
  const unused = {};
  if (!facts) return unused;
  const name = String(model).split(" ").slice(1).join(" ");
  if (!facts.takes_steps_and_guidance) {
    unused.num_inference_steps = `${name} chooses its own steps`;
    unused.guidance = `${name} chooses its own guidance`;
  }
  if (!facts.quality_formats.includes(outputFormat)) {
    unused.output_quality = facts.quality_formats.length ? `not used for ${outputFormat}` : `${facts.provider} does not take it`;
  }
  return unused;
}
