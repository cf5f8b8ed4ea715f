"""Editing and core graphs in a real ComfyUI (``COMFYUI_PATH``), on the tiny demo models.

Our Sampler is compared with core ComfyUI's own sampling of the same tiny FLUX.2 file (core Load Diffusion
Model, SamplerCustomAdvanced with Flux2Scheduler): the same LATENT and CONDITIONING give the same latents,
for image-to-image (core VAE Encode, denoise 0.6), inpainting (core Set Latent Noise Mask after Grow Mask),
core conditioning (Reference Latent, FluxGuidance) and ComfyUI's FluxKVCache approximation. Latents are read
back from core Save Latent files. The shipped editing workflows run with the example images the pack installs
into ComfyUI's input folder. Skipped without COMFYUI_PATH (DEVELOPERS.md).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from flux2kit.testing.real_comfyui import REPO

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]

W, H = 96, 64
PROMPT = "a lighthouse on a cliff at dusk"
# Core's FP8 layers dequantize like ours, fp32 on the CPU; only summation order differs. Relative to the
# largest latent value, after a few steps (measured: about 1e-6).
TOLERANCE = 1e-4


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def rgba_png(hole=(20, 44, 20, 44)) -> bytes:
    """A 96x64 test picture whose transparent rectangle (y0, y1, x0, x1) is Load Image's MASK (1 - alpha)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x / W, y / H, (x + y) / (W + H)], axis=-1) * 0.8 + rng.uniform(0, 0.2, (H, W, 3))
    alpha = np.full((H, W, 1), 255.0)
    y0, y1, x0, x1 = hole
    alpha[y0:y1, x0:x1] = 0
    buf = io.BytesIO()
    Image.fromarray(np.concatenate([rgb * 255, alpha], axis=-1).astype(np.uint8), "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def base_graph(names) -> dict:
    """Our loaders and text encoder, core's loaders of the same files, and the uploaded test picture."""
    return {
        "1": node("Flux2KitTransformerLoader", model_name=names["transformer"], weight_mode="fp8 as stored",
                  offload_blocks=False),
        "2": node("Flux2KitTextEncoderLoader", text_encoder_name=names["text_encoder"]),
        "3": node("Flux2KitVAELoader", vae_name=names["comfy_vae"]),
        "4": node("Flux2KitTextEncode", text_encoder=["2", 0], prompt=PROMPT),
        "5": node("UNETLoader", unet_name=names["transformer"], weight_dtype="default"),
        "6": node("VAELoader", vae_name=names["comfy_vae"]),
        "7": node("LoadImage", image="flux2kit_edit_test.png"),
        "8": node("Flux2KitToCoreConditioning", conditioning=["4", 0]),
    }


def our_sampler(cond, **kw):
    inputs = dict(transformer=["1", 0], conditioning=cond, aspect_ratio="1:1", resolution="1 MP", width=0, height=0,
                  num_inference_steps=3, guidance=4.0, seed=11, batch_size=1)
    return node("Flux2KitSampler", **{**inputs, **kw})


def core_sampler(graph, key, cond, latent, *, steps, denoise=1.0, model=("5", 0)):
    """Core SamplerCustomAdvanced: RandomNoise, BasicGuider, euler, Flux2Scheduler(+ SplitSigmasDenoise)."""
    graph[f"{key}n"] = node("RandomNoise", noise_seed=11)
    graph[f"{key}g"] = node("BasicGuider", model=list(model), conditioning=cond)
    graph[f"{key}s"] = node("KSamplerSelect", sampler_name="euler")
    total = int(steps / denoise)
    graph[f"{key}f"] = node("Flux2Scheduler", steps=total, width=W, height=H)
    sigmas = [f"{key}f", 0]
    if denoise < 1:
        graph[f"{key}d"] = node("SplitSigmasDenoise", sigmas=[f"{key}f", 0], denoise=steps / total)
        sigmas = [f"{key}d", 1]
    graph[key] = node("SamplerCustomAdvanced", noise=[f"{key}n", 0], guider=[f"{key}g", 0], sampler=[f"{key}s", 0],
                      sigmas=sigmas, latent_image=latent)
    return [key, 0]


def saved_latent(server, run, node_id):
    from safetensors.torch import load_file

    item = run.outputs[node_id]["latents"][0]
    return load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def saved_image(server, run, node_id):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(server.view(run.outputs[node_id]["images"][0]))).convert("RGB"))


def close(a, b, what):
    diff = (a - b).abs().max().item() / b.abs().max().item()
    print(f"{what}: max relative difference {diff:.2e}")
    assert a.shape == b.shape and diff < TOLERANCE, (what, diff)
    return diff


@pytest.fixture(scope="module")
def server(comfyui):
    comfyui.upload_image("flux2kit_edit_test.png", rgba_png())
    return comfyui


def test_core_vae_encode_into_our_sampler_into_core_vae_decode(server):
    """Image-to-image across core nodes: core VAE Encode -> our Sampler (denoise 0.6) -> core VAE Decode; and core's
    own sampler on the same LATENT with the start image as a Reference Latent (what source_as_reference adds)."""
    g = base_graph(server.model_names)
    g["10"] = node("VAEEncode", pixels=["7", 0], vae=["6", 0])
    g["11"] = our_sampler(["4", 0], latent=["10", 0], denoise=0.6, num_inference_steps=3)
    g["12"] = node("VAEDecode", samples=["11", 0], vae=["6", 0])
    g["13"] = node("SaveImage", images=["12", 0], filename_prefix="flux2kit/edit_i2i")
    g["14"] = node("SaveLatent", samples=["11", 0], filename_prefix="flux2kit/edit_i2i_ours")
    g["20"] = node("ReferenceLatent", conditioning=["8", 0], latent=["10", 0])
    g["21"] = node("FluxGuidance", conditioning=["20", 0], guidance=4.0)
    core = core_sampler(g, "22", ["21", 0], ["10", 0], steps=3, denoise=0.6)
    g["23"] = node("SaveLatent", samples=core, filename_prefix="flux2kit/edit_i2i_core")
    run = server.run(g)
    assert run.ok, run.describe()
    image = saved_image(server, run, "13")
    assert image.shape == (H, W, 3) and image.std() > 5
    close(saved_latent(server, run, "14"), saved_latent(server, run, "23"), "image-to-image, ours vs core")


def test_core_set_latent_noise_mask_and_grow_mask_into_our_inpaint(server):
    """Load Image's MASK (its transparency) -> Grow Mask -> Set Latent Noise Mask on core VAE Encode's LATENT ->
    our Sampler equals core's own sampler on that LATENT (mask edges on whole 16-pixel cells, so ComfyUI's soft
    latent mask and diffusers' binarized one agree). With FLUX.2 VAE Encode and Decode, paste-back keeps every
    pixel outside the mask exactly."""
    g = base_graph(server.model_names)
    g["10"] = node("VAEEncode", pixels=["7", 0], vae=["6", 0])
    g["15"] = node("GrowMask", mask=["7", 1], expand=4, tapered_corners=False)  # 16-48 x 16-48: whole cells
    g["16"] = node("SetLatentNoiseMask", samples=["10", 0], mask=["15", 0])
    g["11"] = our_sampler(["4", 0], latent=["16", 0], denoise=0.8, num_inference_steps=4)
    g["14"] = node("SaveLatent", samples=["11", 0], filename_prefix="flux2kit/edit_inpaint_ours")
    g["20"] = node("ReferenceLatent", conditioning=["8", 0], latent=["10", 0])
    g["21"] = node("FluxGuidance", conditioning=["20", 0], guidance=4.0)
    core = core_sampler(g, "22", ["21", 0], ["16", 0], steps=4, denoise=0.8)
    g["23"] = node("SaveLatent", samples=core, filename_prefix="flux2kit/edit_inpaint_core")
    # flux2kit's own encode/decode: paste-back, and our MASK output into a core mask node
    g["30"] = node("Flux2KitVAEEncode", vae=["3", 0], image=["7", 0], mask=["15", 0])
    g["31"] = our_sampler(["4", 0], latent=["30", 0], denoise=0.8, num_inference_steps=4)
    g["32"] = node("Flux2KitDecode", vae=["3", 0], latent=["31", 0])
    g["33"] = node("SaveImage", images=["32", 0], filename_prefix="flux2kit/edit_inpaint_pasted")
    g["34"] = node("MaskToImage", mask=["30", 2])
    g["35"] = node("SaveImage", images=["34", 0], filename_prefix="flux2kit/edit_inpaint_mask")
    run = server.run(g)
    assert run.ok, run.describe()
    ours, core = saved_latent(server, run, "14"), saved_latent(server, run, "23")
    close(ours, core, "inpaint, ours vs core")
    mask = saved_image(server, run, "35")[..., 0] > 127
    assert mask[16:48, 16:48].all() and mask.sum() == 32 * 32  # the grown mask, through core Mask To Image
    from PIL import Image

    # What Save Image writes for Load Image's own pixels (uint8 -> /255 -> x255 -> truncated, in float32)
    rgb = np.asarray(Image.open(io.BytesIO(rgba_png())).convert("RGB")).astype(np.float32) / 255.0
    source = np.clip(255.0 * rgb, 0, 255).astype(np.uint8)
    pasted = saved_image(server, run, "33")
    assert np.array_equal(pasted[~mask], source[~mask]) and np.abs(pasted[mask].astype(int) - source[mask]).mean() > 2


def test_core_conditioning_with_reference_latent_and_flux_guidance_equals_ours(server):
    """A CONDITIONING made from our text encoder, through core Reference Latent and FluxGuidance, into our Sampler
    gives our own conditioning's picture (to the bit); core's sampler on the same CONDITIONING gives the same
    latents; an empty Flux 2 latent sets the size."""
    g = base_graph(server.model_names)
    g["10"] = node("Flux2KitVAEEncode", vae=["3", 0], image=["7", 0])
    g["20"] = node("ReferenceLatent", conditioning=["8", 0], latent=["10", 0])
    g["21"] = node("FluxGuidance", conditioning=["20", 0], guidance=4.0)
    g["24"] = node("EmptyFlux2LatentImage", width=W, height=H, batch_size=1)
    g["11"] = our_sampler(["21", 0], latent=["24", 0], guidance=1.0)  # the conditioning's guidance wins
    g["12"] = node("SaveLatent", samples=["11", 0], filename_prefix="flux2kit/core_cond_ours_core")
    g["30"] = node("Flux2KitReferenceEncode", vae=["3", 0], reference_size="1 MP each (standard)",
                   **{"images.image_1": ["7", 0]})
    g["31"] = our_sampler(["4", 0], references=["30", 0], width=W, height=H)
    g["32"] = node("SaveLatent", samples=["31", 0], filename_prefix="flux2kit/core_cond_ours_ours")
    core = core_sampler(g, "22", ["21", 0], ["24", 0], steps=3)
    g["23"] = node("SaveLatent", samples=core, filename_prefix="flux2kit/core_cond_core")
    g["40"] = node("Flux2KitDecode", vae=["3", 0], latent=["11", 0])
    g["41"] = node("PreviewImage", images=["40", 0])
    run = server.run(g)
    assert run.ok, run.describe()
    with_core, with_ours = saved_latent(server, run, "12"), saved_latent(server, run, "32")
    assert with_core.shape == (1, 128, H // 16, W // 16)
    assert (with_core - with_ours).abs().max().item() == 0.0
    close(with_core, saved_latent(server, run, "23"), "core conditioning, our sampler vs core's")
    assert run.outputs["41"]["images"][0]["type"] == "temp"  # core Preview Image took our IMAGE


def test_approximate_reference_cache_equals_core_flux_kv_cache(server):
    """reference_cache 'approximate' on the plain model is core's experimental Flux KV Cache node."""
    g = base_graph(server.model_names)
    g["10"] = node("Flux2KitVAEEncode", vae=["3", 0], image=["7", 0])
    g["20"] = node("ReferenceLatent", conditioning=["8", 0], latent=["10", 0])
    g["21"] = node("FluxGuidance", conditioning=["20", 0], guidance=4.0)
    g["24"] = node("EmptyFlux2LatentImage", width=W, height=H, batch_size=1)
    g["11"] = our_sampler(["21", 0], latent=["24", 0], num_inference_steps=4, reference_cache="approximate")
    g["12"] = node("SaveLatent", samples=["11", 0], filename_prefix="flux2kit/kv_ours")
    g["13"] = our_sampler(["21", 0], latent=["24", 0], num_inference_steps=4, reference_cache="off")
    g["14"] = node("SaveLatent", samples=["13", 0], filename_prefix="flux2kit/kv_ours_uncached")
    g["25"] = node("FluxKVCache", model=["5", 0])
    core = core_sampler(g, "22", ["21", 0], ["24", 0], steps=4, model=("25", 0))
    g["23"] = node("SaveLatent", samples=core, filename_prefix="flux2kit/kv_core")
    run = server.run(g)
    assert run.ok, run.describe()
    ours, core, uncached = (saved_latent(server, run, k) for k in ("12", "23", "14"))
    diff = close(ours, core, "approximate reference cache, ours vs core FluxKVCache")
    gap = (ours - uncached).abs().max().item() / uncached.abs().max().item()
    print(f"approximate vs uncached latents: max relative difference {gap:.2e}")
    assert gap > 100 * diff  # the comparison with core tells the approximation from the uncached run


# -- the shipped editing workflows, with the example images the pack installs -----------------------------

EXAMPLES = REPO / "workflows" / "example_inputs"
EDIT_WORKFLOWS = {"image_to_image": (384, 256), "inpaint": (384, 256), "outpaint": (640, 256),
                  "multi_reference_cached": (128, 128)}
EDIT_IMAGES = ("flux2kit_cottage.png", "flux2kit_cottage_inpaint.png", "flux2kit_teapot.png", "flux2kit_pattern.png")


def test_the_pack_installed_the_editing_example_images(comfyui):
    """When ComfyUI loaded flux2kit it copied the example images into its (empty) input folder."""
    for name in EDIT_IMAGES:
        assert (comfyui.input_dir / name).read_bytes() == (EXAMPLES / name).read_bytes(), name


@pytest.mark.parametrize("stem", list(EDIT_WORKFLOWS))
def test_shipped_editing_workflow_runs(comfyui, stem):
    wf = json.loads((REPO / "workflows" / "api" / f"{stem}.json").read_text(encoding="utf-8"))
    names = comfyui.model_names
    for n in wf.values():
        ct, inputs = n["class_type"], n["inputs"]
        if ct == "Flux2KitTransformerLoader":
            inputs["model_name"] = names["transformer"]
        elif ct == "Flux2KitTextEncoderLoader":
            inputs["text_encoder_name"] = names["text_encoder"]
        elif ct == "Flux2KitVAELoader":
            inputs["vae_name"] = names["vae"]
        elif ct in ("Flux2KitSampler", "Flux2KitGenerate"):
            inputs.update(num_inference_steps=2, width=128, height=128)
    assert {n["inputs"]["image"] for n in wf.values() if n["class_type"] == "LoadImage"} <= set(EDIT_IMAGES)
    run = comfyui.run(wf)
    assert run.ok, run.describe()
    image = [img for img in run.images() if img.get("type") == "output"][0]
    from PIL import Image

    with Image.open(io.BytesIO(comfyui.view(image))) as im:
        assert im.size == EDIT_WORKFLOWS[stem]
