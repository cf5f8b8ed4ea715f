"""Prompt builders: HEX colour palettes and structured JSON prompts (BFL's schema), with previews.

The JSON nodes output a plain STRING, so any prompt input takes it (Text Encode, Generate, the API
node). Subjects and text elements are added by chaining nodes: each takes the list so far and
appends one. The browser extension (web/flux2kit_prompts.js) draws the previews these nodes send.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..pipelines.errors import Flux2KitError
from ..pipelines.prompting import json_prompt as J
from ..pipelines.prompting import palette as P
from . import services
from .types import CATEGORY, Palette, Subjects, TextElements, TextEncoder

PROMPTS = f"{CATEGORY}/prompt"
PICKERS = 5
_PICKER_DEFAULTS = ("#02EB3C", "#FF6B6B", "#1E3A5F", "#F5F5DC", "#000000")


def _node_id(cls):
    return cls.hidden.unique_id if cls.hidden else None


def _colors_ui(colors) -> list[dict]:
    return [{"hex": c.hex, "name": c.name, "object": c.object} for c in colors]


def _swatches(colors) -> torch.Tensor:
    return torch.from_numpy(P.render_swatches(colors))


def _palette_output(cls, colors: tuple) -> io.NodeOutput:
    fragment = P.prompt_fragment(colors)
    services.show_text(_node_id(cls), fragment)
    # the browser shows the fragment with the swatches (web/flux2kit_prompts.js), once
    ui = {"flux2kit_colors": _colors_ui(colors), "flux2kit_status": [fragment]}
    return io.NodeOutput(colors, fragment, _swatches(colors), ui=ui)


def _palette_outputs():
    return [
        Palette.Output(display_name="palette", tooltip="The colours, for FLUX.2 JSON Prompt or JSON Subject."),
        io.String.Output(display_name="prompt_fragment",
                         tooltip="The colours as FLUX.2 follows them in a text prompt: "
                                 "'the vase is color #02EB3C (lime)'. Concatenate it with your prompt."),
        io.Image.Output(display_name="swatches", tooltip="A swatch strip with HEX codes and names, for Preview Image."),
    ]


def _entry_ui(entry: str) -> dict:
    """A JSON palette entry ("#02EB3C" or "#02EB3C for the vase") as a swatch for the browser preview."""
    rest = entry[7:].strip()
    return {"hex": entry[:7], "name": P.nearest_color_name(entry[:7]),
            "object": rest[4:] if rest.startswith("for ") else ""}


def _prompt_output(cls, data: dict, text_encoder=None) -> io.NodeOutput:
    """The compact prompt string, with the readable preview and the token status on the node."""
    prompt = J.to_prompt_string(data)
    exact, limit = None, J.MAX_TOKENS
    if text_encoder is not None and hasattr(text_encoder, "count_tokens"):
        exact, limit = text_encoder.count_tokens(prompt), getattr(text_encoder, "max_length", J.MAX_TOKENS)
    status, over = J.token_status(prompt, exact, limit)
    services.show_text(_node_id(cls), status)
    ui = {"flux2kit_preview": [J.pretty(data)], "flux2kit_status": [status], "flux2kit_warning": [over]}
    palette = data.get("color_palette", [])
    if palette:
        ui["flux2kit_colors"] = [_entry_ui(e) for e in palette if isinstance(e, str)]
    return io.NodeOutput(prompt, ui=ui)


class HexPalette(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        pickers = []
        for i in range(1, PICKERS + 1):
            pickers += [
                io.Color.Input(f"color_{i}", default=_PICKER_DEFAULTS[i - 1], socketless=False,
                               tooltip=f"Colour {i} (used when use_pickers >= {i}). Pick it, or connect a colour."),
                io.String.Input(f"object_{i}", default="",
                                tooltip=f"What colour {i} colours, e.g. 'the vase' (FLUX.2 then writes 'the vase is "
                                        f"color #...'). Empty: a general palette colour."),
            ]
        return io.Schema(
            node_id="Flux2KitHexPalette",
            display_name="FLUX.2 HEX Palette (flux2kit)",
            category=PROMPTS,
            description="Exact colours for FLUX.2, picked or typed, each optionally bound to an object. Outputs a "
                        "palette for the JSON prompt nodes, a text fragment ('the vase is color #02EB3C (lime)'), "
                        "and swatches. Names are the nearest CSS colours by CIEDE2000. BFL recommends 3-5 colours.",
            inputs=[
                io.String.Input("colors", multiline=True, default="",
                                tooltip="Typed colours, one per line: '#02EB3C the vase' or 'ff6b6b' (#RGB or "
                                        "#RRGGBB, any case, '#' optional; the object after the code is optional). "
                                        "They come after the picked colours."),
                io.Int.Input("use_pickers", default=3, min=0, max=PICKERS,
                             tooltip=f"How many of the colour pickers below to use (0-{PICKERS})."),
                *pickers,
                Palette.Input("palette", optional=True,
                              tooltip="Optional: a palette to extend (its colours come first)."),
            ],
            outputs=_palette_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, colors="", use_pickers=3, palette=None, **pickers) -> io.NodeOutput:
        found = list(palette or ())
        problems = []
        for i in range(1, int(use_pickers) + 1):
            try:
                found.append(P.PaletteColor.make(pickers.get(f"color_{i}", _PICKER_DEFAULTS[i - 1]),
                                                 pickers.get(f"object_{i}", "")))
            except Flux2KitError as e:
                problems.append(f"color_{i}: {e}")
        try:
            found += P.parse_color_lines(colors or "")
        except Flux2KitError as e:
            problems.append(str(e))
        if problems:
            raise Flux2KitError(" ".join(problems))
        if not found:
            raise Flux2KitError("The palette is empty: set use_pickers to 1 or more, or type colours (one per line).")
        P.check_palette_size(len(found))
        return _palette_output(cls, tuple(found))


class PaletteFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitPaletteFromImage",
            display_name="FLUX.2 Palette From Image (flux2kit)",
            category=PROMPTS,
            description="The k dominant colours of an image (k-means in CIELAB with a fixed seed: the same image "
                        "always gives the same palette), most frequent first.",
            inputs=[
                io.Image.Input("image", tooltip="The image (a batch counts as one image's pixels)."),
                io.Int.Input("count", default=5, min=1, max=P.MAX_PALETTE_COLORS,
                             tooltip="How many colours to extract. BFL recommends 3-5 in a prompt."),
            ],
            outputs=_palette_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, image, count=5) -> io.NodeOutput:
        return _palette_output(cls, tuple(P.dominant_colors(image, int(count))))


class JSONSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitJSONSubject",
            display_name="FLUX.2 JSON Subject (flux2kit)",
            category=PROMPTS,
            description="One subject of a JSON prompt. Chain them: each takes the subjects so far and adds one; "
                        "the first in the chain is subject 1 (earlier weighs more).",
            inputs=[
                io.String.Input("description", multiline=True, default="",
                                tooltip="What the subject is, in detail: 'a ceramic vase with a narrow neck'."),
                io.String.Input("position", default="", tooltip="Where in the frame: 'center foreground'."),
                io.String.Input("action", default="", tooltip="What it does: 'catching the light'."),
                io.String.Input("pose", default="", tooltip="Its pose or orientation (optional)."),
                io.Int.Input("reference_image", default=0, min=0, max=J.MAX_REFERENCES,
                             tooltip="The subject comes from reference image N (numbered in the order wired to "
                                     "Generate / Reference Encode); 0 = none."),
                Palette.Input("palette", optional=True, tooltip="Optional: this subject's colours."),
                Subjects.Input("subjects", optional=True, tooltip="Optional: the subjects so far (chain)."),
            ],
            outputs=[Subjects.Output(display_name="subjects", tooltip="The subjects so far plus this one.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, description="", position="", action="", pose="", reference_image=0, palette=None,
                subjects=None) -> io.NodeOutput:
        if not str(description).strip():
            raise Flux2KitError("The subject has no description: describe it ('a ceramic vase with a narrow neck').")
        subject = J.build_subject(description, position=position, action=action, pose=pose,
                                  color_palette=palette or (), reference=int(reference_image))
        found = tuple(subjects or ()) + (subject,)
        if len(found) > J.MAX_ITEMS:
            raise Flux2KitError(f"{len(found)} subjects are chained; at most {J.MAX_ITEMS}. Merge some.")
        J.validate({"subjects": list(found)})
        status = f"subject {len(found)}: {subject['description'][:60]}"
        services.show_text(_node_id(cls), status)
        return io.NodeOutput(found, ui={"flux2kit_preview": [J.pretty(subject)], "flux2kit_status": [status]})


class JSONText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitJSONText",
            display_name="FLUX.2 JSON Text Element (flux2kit)",
            category=PROMPTS,
            description="Typography for a JSON prompt: the exact text, font, size and placement. Chain them: each "
                        "takes the text elements so far and adds one. Keep text short.",
            inputs=[
                io.String.Input("text", multiline=True, default="",
                                tooltip="The exact text to render, kept as typed (quotes and any script are fine)."),
                io.String.Input("font", default="", tooltip="Font or lettering style: 'bold condensed sans-serif'."),
                io.String.Input("size", default="", tooltip="Size: 'large headline', 'small caption'."),
                io.String.Input("placement", default="", tooltip="Where: 'top center', 'on the mug'."),
                io.String.Input("color", default="",
                                tooltip="Optional text colour, #RGB or #RRGGBB ('#' optional); empty = unspecified."),
                TextElements.Input("text_elements", optional=True,
                                   tooltip="Optional: the text elements so far (chain)."),
            ],
            outputs=[TextElements.Output(display_name="text_elements",
                                         tooltip="The text elements so far plus this one.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, text="", font="", size="", placement="", color="", text_elements=None) -> io.NodeOutput:
        if not str(text).strip():
            raise Flux2KitError("The text element has no text: type the exact words to render.")
        element = J.build_text_element(text, font=font, size=size, placement=placement, color=color)
        found = tuple(text_elements or ()) + (element,)
        if len(found) > J.MAX_ITEMS:
            raise Flux2KitError(f"{len(found)} text elements are chained; at most {J.MAX_ITEMS}. Merge some.")
        status = f"text element {len(found)}: \"{element['text'][:60]}\""
        services.show_text(_node_id(cls), status)
        return io.NodeOutput(found, ui={"flux2kit_preview": [J.pretty(element)], "flux2kit_status": [status]})


def _reference_count_input():
    return io.Int.Input("reference_count", default=0, min=0, max=J.MAX_REFERENCES,
                        tooltip="How many reference images the prompt runs with: every 'image N' it names must be "
                                "1..count. 0 = no check (Generate checks against the images wired to it).")


def _text_encoder_input():
    return TextEncoder.Input("text_encoder", optional=True,
                             tooltip="Optional: the text encoder, for an exact token count (otherwise a "
                                     "conservative estimate). FLUX.2 [dev] reads 512 tokens.")


class JSONPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        def text(name, tip, multiline=False):
            return io.String.Input(name, default="", multiline=multiline, tooltip=tip)

        return io.Schema(
            node_id="Flux2KitJSONPrompt",
            display_name="FLUX.2 JSON Prompt (flux2kit)",
            category=PROMPTS,
            description="A structured prompt in BFL's JSON schema (scene, subjects, style, colour palette, lighting, "
                        "mood, background, composition, camera, text). Outputs compact JSON text for any prompt "
                        "input; shows it readably and warns past 512 tokens. Empty fields are left out.",
            inputs=[
                text("scene", "The overall scene: 'a sunlit Scandinavian kitchen, morning'.", multiline=True),
                text("style", "Artistic style or medium: 'editorial product photography'."),
                text("lighting", "Lighting: 'soft window light from the left'."),
                text("mood", "Emotional tone: 'calm, fresh'."),
                text("background", "Background details: 'white tiles, blurred plants'.", multiline=True),
                text("composition", "Framing and layout: 'rule of thirds, vase on the right third'."),
                text("camera_angle", "Camera angle: 'eye level', 'low angle'."),
                text("camera_lens", "Lens: '85mm', 'wide angle 24mm'."),
                text("depth_of_field", "Focus behaviour: 'shallow, background softly blurred'."),
                _reference_count_input(),
                Palette.Input("palette", optional=True,
                              tooltip="Optional: the image's colour palette (from FLUX.2 HEX Palette or Palette From "
                                      "Image). Colours bound to an object read '#02EB3C for the vase'."),
                Subjects.Input("subjects", optional=True, tooltip="Optional: subjects from FLUX.2 JSON Subject nodes."),
                TextElements.Input("text_elements", optional=True,
                                   tooltip="Optional: typography from FLUX.2 JSON Text Element nodes."),
                _text_encoder_input(),
            ],
            outputs=[io.String.Output(display_name="prompt",
                                      tooltip="Compact JSON prompt text, for Text Encode, Generate or the API node.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, scene="", style="", lighting="", mood="", background="", composition="", camera_angle="",
                camera_lens="", depth_of_field="", reference_count=0, palette=None, subjects=None,
                text_elements=None, text_encoder=None) -> io.NodeOutput:
        data = J.build_prompt(scene=scene, subjects=subjects or (), style=style, color_palette=palette or (),
                              lighting=lighting, mood=mood, background=background, composition=composition,
                              camera_angle=camera_angle, camera_lens=camera_lens, depth_of_field=depth_of_field,
                              text_elements=text_elements or (), reference_count=int(reference_count))
        return _prompt_output(cls, data, text_encoder)


class JSONPromptParse(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitJSONPromptParse",
            display_name="FLUX.2 JSON Prompt Parse (flux2kit)",
            category=PROMPTS,
            description="Checks a pasted JSON prompt against BFL's schema and outputs it as compact JSON text. An "
                        "error lists every problem with the path of its field (subjects[1].color_palette[0]).",
            inputs=[
                io.String.Input("json_prompt", multiline=True, default="",
                                tooltip="A JSON prompt: {\"scene\": ..., \"subjects\": [...], ...}."),
                _reference_count_input(),
                _text_encoder_input(),
            ],
            outputs=[io.String.Output(display_name="prompt",
                                      tooltip="The validated prompt as compact JSON text (HEX codes in upper case).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, json_prompt="", reference_count=0, text_encoder=None) -> io.NodeOutput:
        data = J.parse_prompt(json_prompt, reference_count=int(reference_count))
        return _prompt_output(cls, data, text_encoder)


NODES = [HexPalette, PaletteFromImage, JSONSubject, JSONText, JSONPrompt, JSONPromptParse]
