"""The core nodes the in-process runner stands in for (cli/core_nodes.py: Grow Mask, Feather Mask, Pad Image for
Outpainting) against core ComfyUI's own, in a real ComfyUI (``COMFYUI_PATH``). Skipped without it (DEVELOPERS.md)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from flux2kit.testing.real_comfyui import REPO

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]

INPAINT_EXAMPLE = REPO / "workflows" / "example_inputs" / "flux2kit_cottage_inpaint.png"


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def saved_image(server, run, node_id):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(server.view(run.outputs[node_id]["images"][0]))).convert("RGB"))


def test_the_local_runners_core_nodes_equal_cores(comfyui):
    """GrowMask, FeatherMask and ImagePadForOutpaint give what core ComfyUI's give (compared as saved images), on
    the inpaint example image (installed into ComfyUI's input folder by the pack: its transparency is Load Image's
    MASK). Feather Mask fades the padded mask (1 at the sides), its right side wider than the canvas (capped)."""
    import torch

    from flux2kit.cli.core_nodes import feather_mask, grow_mask, pad_for_outpaint
    from flux2kit.cli.local_runner import load_image

    assert (comfyui.input_dir / INPAINT_EXAMPLE.name).read_bytes() == INPAINT_EXAMPLE.read_bytes()
    g = {"1": node("LoadImage", image=INPAINT_EXAMPLE.name),
         "2": node("GrowMask", mask=["1", 1], expand=6, tapered_corners=True),
         "3": node("MaskToImage", mask=["2", 0]),
         "4": node("SaveImage", images=["3", 0], filename_prefix="flux2kit/core_grow"),
         "5": node("ImagePadForOutpaint", image=["1", 0], left=64, top=16, right=32, bottom=0, feathering=24),
         "6": node("MaskToImage", mask=["5", 1]),
         "7": node("SaveImage", images=["6", 0], filename_prefix="flux2kit/core_pad_mask"),
         "8": node("SaveImage", images=["5", 0], filename_prefix="flux2kit/core_pad_image"),
         "9": node("FeatherMask", mask=["5", 1], left=40, top=8, right=600, bottom=12),
         "10": node("MaskToImage", mask=["9", 0]),
         "11": node("SaveImage", images=["10", 0], filename_prefix="flux2kit/core_feather")}
    run = comfyui.run(g)
    assert run.ok, run.describe()
    image, mask = load_image(str(INPAINT_EXAMPLE))

    def as_saved(t):  # Save Image's conversion of a float IMAGE (or a mask as grey)
        t = t if t.ndim == 4 else t.unsqueeze(-1).expand(-1, -1, -1, 3)
        return np.clip(255.0 * t[0].numpy(), 0, 255).astype(np.uint8)

    canvas, pad_mask = pad_for_outpaint(image, 64, 16, 32, 0, 24)
    assert np.array_equal(saved_image(comfyui, run, "4"), as_saved(grow_mask(mask, 6, True)))
    assert np.array_equal(saved_image(comfyui, run, "7"), as_saved(pad_mask))
    assert np.array_equal(saved_image(comfyui, run, "8"), as_saved(canvas))
    feathered = feather_mask(pad_mask, 40, 8, 600, 12)
    assert np.array_equal(saved_image(comfyui, run, "11"), as_saved(feathered))
    assert not np.array_equal(as_saved(feathered), as_saved(pad_mask))
    assert torch.count_nonzero(pad_mask) > 0
