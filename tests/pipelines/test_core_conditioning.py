"""Core ComfyUI CONDITIONING in the engine, against diffusers: a short conditioning left-padded with zeros as
core's FLUX.2 model pads it gives diffusers' Flux2Pipeline's picture for the zero-padded embeddings."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

from flux2kit.pipelines.generation.conditioning import pad_like_core, read_core_conditioning, sampler_conditioning
from flux2kit.pipelines.generation.generate import sample
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.generation.sampling import unpack


def test_padding_and_guidance_are_cores(transformer_files, tiny_transformer, tiny_text_encoder, tiny_vae):
    t = load_transformer(transformer_files["bfl"], device="cpu")
    short = torch.randn(1, 77, t.text_width, generator=torch.Generator().manual_seed(2))
    cond = sampler_conditioning(t, [[short, {"guidance": 2.5}]], guidance=4.0)
    assert cond.embeds.shape == (1, 512, t.text_width) and torch.equal(cond.embeds[:, 435:], short)
    assert not cond.embeds[:, :435].any() and cond.embedded_guidance == 2.5
    assert any("guidance 2.5 from the conditioning" in n for n in cond.notes)
    ours = sample(t, cond.embeds, None, width=64, height=48, num_inference_steps=2, guidance=4.0, seed=3,
                  embedded_guidance=cond.embedded_guidance)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True,
                                                                   time_shift_type="exponential"),
                         vae=tiny_vae[0], text_encoder=None, tokenizer=tiny_text_encoder[1],
                         transformer=tiny_transformer)
    pipe.set_progress_bar_config(disable=True)
    raw = pipe(prompt_embeds=pad_like_core(short), height=48, width=64, num_inference_steps=2, guidance_scale=2.5,
               generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    expected = unpack(raw, 3, 4)  # Flux2Pipeline's "latent" output: the packed normalised latents
    diff = (ours - expected).abs().max().item()
    print(f"core conditioning (77 tokens, padded) vs Flux2Pipeline: max abs latent diff {diff:.2e}")
    assert diff < 1e-4 * expected.abs().max().item()
    # Not vacuous: diffusers' own padding (pad-token hidden states) would be another picture.
    right = torch.cat([short, torch.zeros(1, 512 - 77, short.shape[-1])], dim=1)
    other = sample(t, right, None, width=64, height=48, num_inference_steps=2, guidance=2.5, seed=3)
    assert (other - ours).abs().max() > 1e-3


def test_absent_and_disabled_guidance():
    e = torch.zeros(1, 600, 8)
    assert read_core_conditioning([[e, {}]]).guidance == 3.5  # core's default
    assert read_core_conditioning([[e, {"guidance": None}]]).guidance is None  # FluxDisableGuidance
    assert read_core_conditioning([[e, {}]]).embeds.shape[1] == 600  # longer than 512: used as it is
