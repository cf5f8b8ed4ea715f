"""Whole text-to-image runs: ours (from BFL and ComfyUI files) against diffusers' Flux2Pipeline on the same weights."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
from transformers import Mistral3ForConditionalGeneration

from flux2kit.pipelines.generation.generate import generate
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.demo_models.transformer import fp8_reference
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.models.vae import load_vae
from flux2kit.testing.pictures import picture

# fp32 on both sides; the only differences are summation order (our fused q|k|v matmul) and
# the reference images' float->uint8 round trip, which is exact for uint8 inputs.
TOLERANCE = 2e-5  # max abs difference of [0, 1] pixel values; measured 0 to 3e-6


REFERENCE_SETS = {
    0: [],
    1: [picture(160, 96, 1)],
    3: [picture(80, 64, 2), picture(100, 72, 3), picture(64, 128, 4)],
}


@pytest.fixture(scope="module")
def ours_components(transformer_files, tiny_text_encoder, tiny_vae):
    return dict(
        bfl=load_transformer(transformer_files["bfl"], device="cpu"),
        comfy=load_transformer(transformer_files["comfy-fp8"], device="cpu"),
        text_encoder=load_text_encoder(tiny_text_encoder[2], device="cpu"),
        vae=load_vae(tiny_vae[1], device="cpu"),
    )


@pytest.fixture(scope="module")
def diffusers_pipes(tiny_transformer, tiny_text_encoder, tiny_vae):
    _, tokenizer, folder = tiny_text_encoder
    text_encoder = Mistral3ForConditionalGeneration.from_pretrained(f"{folder}/text_encoder", torch_dtype=torch.float32)

    def pipe(transformer):
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        p = Flux2Pipeline(scheduler=scheduler, vae=tiny_vae[0], text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
        p.set_progress_bar_config(disable=True)
        return p

    return dict(bfl=pipe(tiny_transformer), comfy=pipe(fp8_reference(tiny_transformer)))


@pytest.mark.parametrize("source", ["bfl", "comfy"])
@pytest.mark.parametrize("n_refs", [0, 1, 3])
def test_matches_diffusers_flux2pipeline(source, n_refs, ours_components, diffusers_pipes):
    refs = REFERENCE_SETS[n_refs]
    prompt = "a red fox in fresh snow, morning light"
    width, height, steps, seed = 128, 96, 3, 1234
    expected = diffusers_pipes[source](
        prompt=prompt, image=refs or None, height=height, width=width, num_inference_steps=steps,
        guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images
    ours = generate(ours_components[source], ours_components["text_encoder"], ours_components["vae"],
                    prompt=prompt, images=refs, width=width, height=height, num_inference_steps=steps,
                    guidance=4.0, seed=seed)
    assert ours.shape == (1, height, width, 3)
    expected = expected.permute(0, 2, 3, 1)
    diff = (ours - expected).abs().max().item()
    print(f"{source} refs={n_refs}: max abs diff {diff:.2e}")
    assert diff < TOLERANCE, diff
    # The comparison is not vacuous: another seed changes the image.
    other = generate(ours_components[source], ours_components["text_encoder"], ours_components["vae"],
                     prompt=prompt, images=refs, width=width, height=height, num_inference_steps=steps,
                     guidance=4.0, seed=seed + 1)
    assert (other - expected).abs().max().item() > 100 * TOLERANCE


def test_batch_item_i_equals_a_single_run_with_seed_plus_i(ours_components):
    c = ours_components
    kw = dict(prompt="a lighthouse", width=64, height=64, num_inference_steps=2, guidance=4.0)
    batch = generate(c["comfy"], c["text_encoder"], c["vae"], seed=7, batch_size=3, **kw)
    single = generate(c["comfy"], c["text_encoder"], c["vae"], seed=9, batch_size=1, **kw)
    assert batch.shape[0] == 3
    torch.testing.assert_close(batch[2:3], single, rtol=0, atol=1e-5)


def test_progress_callback_and_cancel(ours_components):
    from flux2kit.pipelines.generation.sampling import Cancelled

    c = ours_components
    seen = []
    generate(c["bfl"], c["text_encoder"], c["vae"], prompt="x", width=64, height=64, num_inference_steps=3,
             callback=lambda i, n, lat: seen.append((i, n, tuple(lat.shape))))
    assert seen == [(1, 3, (1, 128, 4, 4)), (2, 3, (1, 128, 4, 4)), (3, 3, (1, 128, 4, 4))]
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled, match="before step 3 of 5"):
        generate(c["bfl"], c["text_encoder"], c["vae"], prompt="x", width=64, height=64, num_inference_steps=5,
                 should_cancel=cancel_after_two)
