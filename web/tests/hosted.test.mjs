// node --test web/tests
import assert from "node:assert/strict";
import { test } from "node:test";

import { costText, estimateCost, estimateText, sizeFromAspect, unusedApiInputs } from "../lib/hosted.js";

// A table shaped like /flux2kit/api_models (tests/nodes/test_web.py checks the real one against Python).
const SIZE = { megapixel: 1048576, resolutions: { "0.5 MP": 0.5, "1 MP": 1, "2 MP": 2, "4 MP": 4 }, multiple: 16,
               min_side: 64, max_side: 4096, max_pixels: 4194304 };
const BFL = { provider: "Black Forest Labs", exact_size: true, quality_formats: [], max_references: 8,
              reference_pixels: 1048576, single_reference_pixels: 4194304, resolutions: Object.keys(SIZE.resolutions) };
const TABLE = {
  size: SIZE,
  models: {
    "BFL flux-2-pro": { ...BFL, price: [0.03, 0.015], takes_steps_and_guidance: false },
    "BFL flux-2-flex": { ...BFL, price: [0.05, 0.05], takes_steps_and_guidance: true },
    "BFL flux-2-pro-preview": { ...BFL, price: null, takes_steps_and_guidance: false },
    "Oxen flux-2-pro": { provider: "Oxen.ai", price: null, exact_size: false, takes_steps_and_guidance: true,
                         quality_formats: ["webp", "jpeg"], max_references: 8, reference_pixels: 1048576,
                         single_reference_pixels: 4194304, resolutions: ["0.5 MP", "1 MP", "2 MP"] },
  },
};
const INPUTS = { model: "BFL flux-2-pro", aspect_ratio: "1:1", resolution: "1 MP", width: 0, height: 0, batch_size: 1,
                 references: 0 };

test("sizeFromAspect follows the Python rule", () => {
  assert.deepEqual(sizeFromAspect(SIZE, "1:1", "1 MP"), [1024, 1024]);
  assert.deepEqual(sizeFromAspect(SIZE, "16:9", "1 MP"), [1360, 768]); // tests/pipelines/test_api_client.py
  assert.deepEqual(sizeFromAspect(SIZE, "match_input_image", "1 MP", [300, 200]), [1248, 832]);
  assert.equal(sizeFromAspect(SIZE, "match_input_image", "1 MP"), null);
  assert.equal(sizeFromAspect(SIZE, "1:1", "8 MP"), null);
});

test("the [pro] estimate: $0.03 first MP, $0.015 per further output or input MP", () => {
  const one = estimateCost(TABLE, INPUTS);
  assert.equal(one.known, true);
  assert.ok(Math.abs(one.low - 0.03) < 1e-12 && one.low === one.high);
  assert.deepEqual(one.size, [1024, 1024]);
  const big = estimateCost(TABLE, { ...INPUTS, width: 2048, height: 2048, batch_size: 2 });
  assert.ok(Math.abs(big.low - 2 * (0.03 + 3 * 0.015)) < 1e-12);
  assert.match(estimateText(big), /^Estimate: \$0\.150 for 2 images, 2048x2048\. Black Forest Labs price list: /);
});

test("references make a range: their size is read only when sent", () => {
  const two = estimateCost(TABLE, { ...INPUTS, references: 2 });
  assert.ok(Math.abs(two.low - 0.045) < 1e-12 && Math.abs(two.high - 0.06) < 1e-12); // 1..2 input MP
  const lone = estimateCost(TABLE, { ...INPUTS, references: 1 });
  assert.ok(Math.abs(lone.high - (0.03 + 4 * 0.015)) < 1e-12); // a lone reference may be up to 4 MP
  assert.match(estimateText(two), /\$0\.045-\$0\.060 for 1 image, 1024x1024 \(the references' size counts/);
  const match = estimateCost(TABLE, { ...INPUTS, aspect_ratio: "match_input_image", references: 1 });
  assert.equal(match.about, true);
  assert.match(estimateText(match), /image 1's shape sets the output size/);
});

test("no estimate without a price or a known size, and it says why", () => {
  assert.match(estimateText(estimateCost(TABLE, { ...INPUTS, model: "Oxen flux-2-pro" })),
               /cost unknown: Oxen\.ai lists no per-image price/);
  assert.match(estimateText(estimateCost(TABLE, { ...INPUTS, model: "BFL flux-2-pro-preview" })),
               /cost unknown: not on the price list/);
  assert.match(estimateText(estimateCost(TABLE, { ...INPUTS, width: undefined })), /size comes from another node/);
  assert.match(estimateText(estimateCost(TABLE, { ...INPUTS, width: 512 })), /set both width and height/);
  assert.match(estimateText(estimateCost(TABLE, { ...INPUTS, aspect_ratio: "match_input_image" })),
               /match_input_image needs image 1/);
});

test("the cost of the last run, from the node's output", () => {
  assert.equal(costText({ flux2kit_cost: [{ usd: 0.09, how: "reported by Black Forest Labs", images: 2, requested: 2 }] }),
               "Last run: 2 of 2 images, cost $0.090 (reported by Black Forest Labs)");
  assert.equal(costText({ flux2kit_cost: [{ usd: null, how: "unknown", images: 1, requested: 1 }] }),
               "Last run: 1 of 1 image, cost unknown (see the provider's usage log)");
  assert.equal(costText({ images: [] }), null);
});

test("inputs a model does not use", () => {
  assert.deepEqual(Object.keys(unusedApiInputs(TABLE, "BFL flux-2-pro", "webp")),
                   ["num_inference_steps", "guidance", "output_quality"]);
  assert.deepEqual(Object.keys(unusedApiInputs(TABLE, "BFL flux-2-flex", "png")), ["output_quality"]);
  assert.deepEqual(unusedApiInputs(TABLE, "Oxen flux-2-pro", "webp"), {});
  assert.deepEqual(unusedApiInputs(TABLE, "Oxen flux-2-pro", "png"), { output_quality: "not used for png" });
  assert.equal(unusedApiInputs(TABLE, "BFL flux-2-pro", "webp").guidance, "flux-2-pro chooses its own guidance");
});
