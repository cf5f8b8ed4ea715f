// node --test web/tests   (files end in .mjs so ComfyUI, which loads every web/**/*.js, never loads them)
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  clampLines, normalizeHex, previewHeight, previewModel, readableInk, rootNodeId, swatchLabel, swatchLayout,
} from "../lib/preview.js";

// One list of cases for both parsers: tests/pipelines/test_palette.py runs parse_hex on the same file.
const HEX_CASES = JSON.parse(readFileSync(new URL("./hex_cases.json", import.meta.url), "utf8"));

function hexMismatches(normalize) {
  const out = [];
  for (const [input, expected] of HEX_CASES.accepted) {
    const got = normalize(input);
    if (got !== expected) out.push(`${JSON.stringify(input)}: ${got} instead of ${expected}`);
  }
  for (const input of HEX_CASES.refused) {
    const got = normalize(input);
    if (got !== null) out.push(`${JSON.stringify(input)}: accepted as ${got}`);
  }
  return out;
}

test("normalizeHex accepts and refuses what the Python parser does (web/tests/hex_cases.json)", () => {
  assert.deepEqual(hexMismatches(normalizeHex), []);
  assert.equal(normalizeHex(undefined), null); // no JSON for undefined
});

test("the shared HEX cases catch a parser that keeps any alpha", () => {
  // Mutation: an 8-digit form loses its alpha whatever the alpha (the parsers accept only FF, opaque).
  const anyAlpha = (t) => {
    const s = typeof t === "string" ? t.trim() : t;
    return normalizeHex(typeof s === "string" && s.replace(/^#/, "").length === 8 ? s.slice(0, -2) : t);
  };
  assert.ok(hexMismatches(anyAlpha).some((m) => m.startsWith('"#ff6b6b80"')), hexMismatches(anyAlpha).join("; "));
});

test("readableInk picks black on light colours and white on dark ones", () => {
  assert.equal(readableInk("#FFFFFF"), "#000000");
  assert.equal(readableInk("#02EB3C"), "#000000");
  assert.equal(readableInk("#000000"), "#FFFFFF");
  assert.equal(readableInk("#1E3A5F"), "#FFFFFF");
  assert.equal(readableInk("#0000FF"), "#FFFFFF");
  assert.equal(readableInk("not a colour"), "#000000");
});

test("swatchLabel names the bound object", () => {
  assert.equal(swatchLabel({ hex: "#02EB3C", name: "lime", object: "the vase" }), "#02EB3C lime - the vase");
  assert.equal(swatchLabel({ hex: "#FFFFFF", name: "white", object: "" }), "#FFFFFF white");
});

test("previewModel reads a JSON prompt node's output", () => {
  const output = {
    flux2kit_preview: ['{\n  "scene": "a kitchen",\n  "text_elements": [{"text": "Say \\"hi\\" — 你好"}]\n}'],
    flux2kit_status: ["about 640 of 512 tokens (estimate) - WARNING: over 512"],
    flux2kit_warning: [true],
    flux2kit_colors: [{ hex: "#02eb3c", name: "lime", object: "the vase" }, { hex: "#GGG", name: "bad" }, null],
  };
  const model = previewModel(output);
  assert.equal(model.text, output.flux2kit_preview[0]);
  assert.ok(model.text.includes("你好"));
  assert.equal(model.warning, true);
  assert.match(model.status, /WARNING/);
  assert.deepEqual(model.colors, [
    { hex: "#02EB3C", name: "lime", object: "the vase", ink: "#000000", label: "#02EB3C lime - the vase" },
  ]);
});

test("previewModel takes the latest of merged outputs and ignores foreign ones", () => {
  assert.equal(previewModel({ images: [{ filename: "x.png" }] }), null);
  assert.equal(previewModel(null), null);
  assert.equal(previewModel("text"), null);
  const model = previewModel({ flux2kit_preview: ["old", "new"], flux2kit_warning: [true, false] });
  assert.equal(model.text, "new");
  assert.equal(model.warning, false);
  assert.equal(model.status, "");
  assert.deepEqual(model.colors, []);
  assert.equal(previewModel({ flux2kit_warning: ["true"], flux2kit_status: ["1 of 512"] }).warning, false);
});

test("clampLines keeps long previews a sensible size", () => {
  const text = Array.from({ length: 100 }, (_, i) => `line ${i}`).join("\n");
  const clamped = clampLines(text, 10).split("\n");
  assert.equal(clamped.length, 11);
  assert.equal(clamped[9], "line 9");
  assert.equal(clamped[10], "... 90 more lines");
  assert.equal(clampLines("a\nb", 10), "a\nb");
  assert.equal(clampLines(undefined), "");
  assert.equal(previewModel({ flux2kit_preview: [text] }, { maxLines: 5 }).text.split("\n").length, 6);
});

test("swatchLayout wraps swatches into rows that fit the width", () => {
  const rects = swatchLayout(5, 290, { minWidth: 72, height: 20, gap: 4 });
  assert.equal(rects.length, 5);
  const perRow = rects.filter((r) => r.y === 0).length;
  assert.equal(perRow, 3); // 3 * 72 + 2 * 4 = 224 <= 290 < 4 * 72 + 3 * 4 = 300
  for (const r of rects) assert.ok(r.x + r.w <= 290 + 1e-9 && r.w >= 72);
  assert.deepEqual(rects[3], { x: 0, y: 24, w: rects[0].w, h: 20 });
  assert.deepEqual(swatchLayout(0, 300), []);
  assert.equal(swatchLayout(3, 10).length, 3); // narrower than one swatch: one per row
  assert.equal(swatchLayout(3, 10)[2].y, 2 * (28 + 4));
});

test("rootNodeId maps execution ids to root-graph node ids", () => {
  assert.equal(rootNodeId("12"), 12);
  assert.equal(rootNodeId(7), 7);
  assert.equal(rootNodeId("12:5"), null);
  assert.equal(rootNodeId(""), null);
  assert.equal(rootNodeId(undefined), null);
});

test("previewHeight makes room for the status, every swatch row and up to maxTextLines of text", () => {
  const colors = [{ hex: "#1E3A5F", name: "dark slate blue" }, { hex: "#F2E8CF", name: "papaya whip", object: "the walls" },
                  { hex: "#E07A5F", name: "salmon", object: "the clay pots" }];
  const palette = previewModel({ flux2kit_colors: colors, flux2kit_status: ["the walls is color #F2E8CF (papaya whip), " +
    "the clay pots is color #E07A5F (salmon), color palette #1E3A5F (dark slate blue)"] });
  const narrow = previewHeight(palette, 340);
  const wide = previewHeight(palette, 1200);
  assert.ok(narrow > wide, "a narrow node wraps the swatches and the status into more rows");
  assert.ok(narrow >= 2 * 23 + 2 * 15, `two swatch rows and two status lines at 340 px: ${narrow}`);
  const long = previewModel({ flux2kit_preview: [Array.from({ length: 80 }, (_, i) => `line ${i}`).join("\n")],
                              flux2kit_status: ["1 of 512 tokens"] });
  assert.equal(previewHeight(long, 400, { maxTextLines: 16 }), 15 + 4 + 16 * 15 + 10); // longer text scrolls
  assert.equal(previewHeight(null, 400), 0);
});
