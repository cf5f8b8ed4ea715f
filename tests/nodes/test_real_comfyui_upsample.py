"""The prompt-upsampling workflow (workflows/api/prompt_upsample_reference.json) inside a real ComfyUI, on the demo
models: the loader's full model, FLUX.2 Prompt Upsample reading the reference, and Text Encode using its text.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout (DEVELOPERS.md).
"""

from __future__ import annotations

import copy
import io
import json
import os

import pytest

from flux2kit.testing.pictures import png_bytes
from flux2kit.testing.real_comfyui import REPO

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]

WORKFLOW = REPO / "workflows" / "api" / "prompt_upsample_reference.json"


def on_demo_models(names: dict, *, upsample_seed=7) -> dict:
    """The shipped workflow on the tiny models: 4 new tokens (random weights never end their text), 2 steps, 64x64."""
    wf = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    for node in wf.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "Flux2KitTransformerLoader":
            inputs["model_name"] = names["transformer"]
        elif ct == "Flux2KitTextEncoderLoader":
            inputs["text_encoder_name"] = names["text_encoder"]
        elif ct == "Flux2KitVAELoader":
            inputs["vae_name"] = names["vae"]
        elif ct == "Flux2KitPromptUpsample":
            inputs.update(max_new_tokens=4, seed=upsample_seed)
        elif ct == "Flux2KitSampler":
            inputs.update(num_inference_steps=2, width=64, height=64)
    return wf


def pixels(server, run):
    import numpy as np
    from PIL import Image

    image = next(i for i in run.images() if i.get("type") == "output")
    return np.asarray(Image.open(io.BytesIO(server.view(image))).convert("RGB"))


def test_upsampling_workflow_runs_and_text_encode_uses_its_text(comfyui):
    import numpy as np

    # its own picture under its own name: the shipped example flux2kit_person.png, which the pack put in the
    # input folder, stays as it is for the other tests on this server
    comfyui.upload_image("flux2kit_test_upsample_reference.png", png_bytes(96, 64, seed=3))
    prompt = on_demo_models(comfyui.model_names)
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "flux2kit_test_upsample_reference.png"
    upsampler = next(k for k, v in prompt.items() if v["class_type"] == "Flux2KitPromptUpsample")
    encode = next(k for k, v in prompt.items() if v["class_type"] == "Flux2KitTextEncode")
    assert prompt[encode]["inputs"]["prompt"] == [upsampler, 0]
    first = comfyui.run(prompt)
    assert first.ok, first.describe()
    ui = first.outputs[upsampler]
    text = ui["flux2kit_preview"][0]
    assert text and text != prompt[upsampler]["inputs"]["prompt"] and ui["flux2kit_warning"] == [False]
    assert ui["flux2kit_status"][0].startswith("image-to-image with 1 reference(s): 4 new tokens, seed 7")
    image = pixels(comfyui, first)

    # Text Encode given that text itself: the same image, so the conditioning was the upsampled text
    literal = copy.deepcopy(prompt)
    literal[encode]["inputs"]["prompt"] = text
    second = comfyui.run(literal)
    assert second.ok, second.describe()
    assert np.array_equal(pixels(comfyui, second), image)

    # another upsampling seed: another text, another image; the first seed again: the first text and image
    other = comfyui.run(on_demo_models(comfyui.model_names, upsample_seed=8))
    assert other.ok, other.describe()
    assert other.outputs[upsampler]["flux2kit_preview"][0] != text
    assert not np.array_equal(pixels(comfyui, other), image)
    again = comfyui.run(prompt)
    assert again.ok, again.describe()
    assert again.outputs[upsampler]["flux2kit_preview"][0] == text
    assert np.array_equal(pixels(comfyui, again), image)
