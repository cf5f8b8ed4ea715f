"""FLUX.2 Prompt Upsample: the whole FLUX.2 [dev] text encoder rewrites a short prompt (looking at the references).

Its output is a plain STRING, so it feeds Text Encode, Generate, the JSON prompt nodes or the API node
like any text; the text also shows on the node (the prompt-preview extension, web/flux2kit_prompts.js).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
from comfy_api.latest import io

from ..pipelines.generation.references import to_pil
from ..pipelines.prompting import upsample as U
from . import services
from .encode import images_input, ordered_images
from .types import CATEGORY, TextEncoder

_CACHE_SIZE = 8


def _image_digest(image) -> str:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(to_pil(image))
    return hashlib.sha256(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()


def upsample_cached(text_encoder, prompt: str, images: list, *, temperature: float, seed: int, max_new_tokens: int,
                    callback=None) -> U.Upsampled:
    """Upsample with a small per-encoder cache (like Text Encode's): the same inputs give the same text, so a
    re-run does not generate again."""
    U.check_upsampler(text_encoder)
    key = (prompt, float(temperature), int(seed), int(max_new_tokens), tuple(_image_digest(i) for i in images))
    cache = text_encoder.__dict__.setdefault("_flux2kit_upsample_cache", OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    services.load_to_device(text_encoder)
    result = U.upsample_prompt(text_encoder, prompt, images, temperature=temperature, seed=seed,
                               max_new_tokens=max_new_tokens, callback=callback)
    cache[key] = result
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return result


def status_line(result: U.Upsampled, seed: int) -> str:
    what = f"{result.mode} with {result.images_used} reference(s)" if result.images_used else result.mode
    lines = [f"{what}: {result.new_tokens} new tokens, seed {seed}"]
    if result.fell_back:
        lines.append("WARNING: the model produced no text; the original prompt is passed on")
    lines += [f"note: {n}" for n in result.notes if not n.startswith("the model produced no text")]
    return "\n".join(lines)


class PromptUpsample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitPromptUpsample",
            display_name="FLUX.2 Prompt Upsample (flux2kit)",
            category=f"{CATEGORY}/prompt",
            description="Rewrites a short prompt into the detailed description FLUX.2 follows best, with FLUX.2 [dev]'s "
                        "own text encoder (as diffusers' upsample_prompt and BFL's reference code). With reference "
                        "images it looks at them and writes an editing instruction. Needs the text encoder loaded with "
                        "parts = 'full model, for prompt upsampling'. Seeded: the same inputs give the same text.",
            inputs=[
                TextEncoder.Input("text_encoder", tooltip="From FLUX.2 Load Text Encoder with parts = 'full model, for "
                                                          "prompt upsampling' (FLUX.2 [dev]'s Mistral; also for [klein])."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The short prompt to expand (e.g. 'a fox in snow'), or an editing request when "
                                        "references are connected. May be empty with references."),
                images_input("Reference images the model looks at (image-to-image mode), numbered in the order wired. "
                             "They are shown side by side as one picture of at most 768x768 pixels, as diffusers and "
                             "BFL do. None: text-to-image mode."),
                io.Float.Input("temperature", default=U.DEFAULT_TEMPERATURE, min=0.0, max=2.0, step=0.01,
                               tooltip="Randomness of the wording: 0.15 is diffusers' and BFL's default; 0 always takes "
                                       "the most likely word (the seed then does not matter)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the sampling: the same prompt, images, temperature and seed give the same "
                                     "text (on the same device and versions)."),
                io.Int.Input("max_new_tokens", default=U.DEFAULT_MAX_NEW_TOKENS, min=1, max=U.MAX_NEW_TOKENS,
                             tooltip="At most this many tokens are written (512 as diffusers and BFL; FLUX.2 reads 512 "
                                     "tokens of prompt). Generation stops earlier when the model ends its text."),
            ],
            outputs=[io.String.Output(display_name="prompt",
                                      tooltip="The upsampled prompt (the original one if the model wrote nothing), for "
                                              "Text Encode, Generate, the JSON prompt nodes or the API node.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, text_encoder, prompt, temperature, seed, max_new_tokens, images=None) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden else None
        flat = ordered_images(images)
        result = upsample_cached(text_encoder, prompt, flat, temperature=temperature, seed=seed,
                                 max_new_tokens=max_new_tokens, callback=services.token_progress(max_new_tokens))
        status = status_line(result, seed)
        services.show_text(node_id, status)
        ui = {"flux2kit_preview": [result.text], "flux2kit_status": [status], "flux2kit_warning": [result.fell_back]}
        return io.NodeOutput(result.text, ui=ui)


NODES = [PromptUpsample]
