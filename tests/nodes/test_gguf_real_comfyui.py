"""GGUF in a real ComfyUI server (``COMFYUI_PATH``): the loaders list .gguf files through the pack's own folder keys
while core's loaders do not, and the GGUF workflow runs on the demo set's GGUF twins.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout; the harness (flux2kit.testing.real_comfyui) refuses to
start when ComfyUI's Python lacks flux2kit's requirements (gguf and accelerate included) and names the install
command; see DEVELOPERS.md.
"""

from __future__ import annotations

import copy
import io
import json
import os

import pytest

from flux2kit.testing.real_comfyui import REPO

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]


def combo(info: dict, node: str, name: str) -> list[str]:
    spec = info[node]["input"]["required"][name]
    if isinstance(spec[0], list):  # a V1 node: the options are the type
        return spec[0]
    return spec[1]["options"]


def test_gguf_files_are_listed_by_flux2kit_and_not_by_core(comfyui):
    info = comfyui.object_info()
    names = comfyui.model_names
    assert names["transformer_gguf"] in combo(info, "Flux2KitTransformerLoader", "model_name")
    assert names["text_encoder_gguf"] in combo(info, "Flux2KitTextEncoderLoader", "text_encoder_name")
    assert not any(o.endswith(".gguf") for o in combo(info, "UNETLoader", "unet_name"))
    assert not any(o.endswith(".gguf") for o in combo(info, "CLIPLoader", "clip_name"))


def test_the_gguf_workflow_runs(comfyui):
    import numpy as np
    from PIL import Image

    workflow = json.loads((REPO / "workflows" / "api" / "gguf_text_to_image.json").read_text(encoding="utf-8"))
    prompt = copy.deepcopy(workflow)
    names = comfyui.model_names
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "Flux2KitTransformerLoader":
            inputs["model_name"] = names["transformer_gguf"]
        elif node["class_type"] == "Flux2KitTextEncoderLoader":
            inputs["text_encoder_name"] = names["text_encoder_gguf"]
        elif node["class_type"] == "Flux2KitVAELoader":
            inputs["vae_name"] = names["vae"]
        elif node["class_type"] == "Flux2KitSampler":
            inputs.update(num_inference_steps=2, width=96, height=64, seed=5)
    run = comfyui.run(prompt)
    assert run.ok, run.describe()
    images = [img for img in run.images() if img.get("type") == "output"]
    assert len(images) == 1
    pixels = np.asarray(Image.open(io.BytesIO(comfyui.view(images[0]))).convert("RGB"))
    assert pixels.shape == (64, 96, 3) and pixels.std() > 1.0
