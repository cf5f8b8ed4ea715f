"""Whole text-to-image runs from GGUF files (transformer and text encoder) against diffusers' Flux2Pipeline /
Flux2KleinPipeline holding the files' dequantized weights."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

from flux2kit.pipelines.demo_models.gguf import (
    dequantized_text_model,
    dequantized_transformer,
    save_tiny_text_encoder_gguf,
    save_tiny_transformer_gguf,
)
from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3
from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3
from flux2kit.pipelines.demo_models.transformer import build_tiny_klein
from flux2kit.pipelines.generation.generate import generate
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.models.vae import load_vae

# fp32 on both sides, the same weights bit for bit: only summation order differs (as in test_pipeline_parity.py).
TOLERANCE = 2e-5  # max abs difference of [0, 1] pixel values
K_MIX = ["Q4_K", "Q6_K", "IQ4_XS", "Q5_K", "Q3_K", "Q2_K", "IQ4_NL"]


def scheduler():
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")


def run_both(pipe, ours_parts, prompt, **kw):
    expected = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(kw["seed"]), output_type="pt",
                    height=kw["height"], width=kw["width"], num_inference_steps=kw["num_inference_steps"],
                    guidance_scale=kw["guidance"]).images.permute(0, 2, 3, 1)
    ours = generate(*ours_parts, prompt=prompt, **kw)
    return ours, expected


def test_dev_text_to_image_from_gguf_equals_flux2pipeline(tiny_transformer, tiny_vae, tmp_path):
    model, tokenizer = build_tiny_mistral3(seed=0)
    te_path, t_path = str(tmp_path / "mistral-Q8_0.gguf"), str(tmp_path / "flux2-dev-kmix.gguf")
    te_ref = dequantized_text_model(model, save_tiny_text_encoder_gguf(model, tokenizer, te_path, arch="llama"))
    t_ref = dequantized_transformer(tiny_transformer, save_tiny_transformer_gguf(tiny_transformer, t_path, K_MIX))
    pipe = Flux2Pipeline(scheduler=scheduler(), vae=tiny_vae[0], text_encoder=te_ref, tokenizer=tokenizer,
                         transformer=t_ref)
    pipe.set_progress_bar_config(disable=True)
    parts = (load_transformer(t_path, device="cpu", dtype=torch.float32), load_text_encoder(te_path),
             load_vae(tiny_vae[1], device="cpu"))
    kw = dict(width=128, height=96, num_inference_steps=3, guidance=4.0, seed=1234)
    ours, expected = run_both(pipe, parts, "a red fox in fresh snow, morning light", **kw)
    diff = (ours - expected).abs().max().item()
    print(f"[dev] GGUF text-to-image: max abs diff {diff:.2e}")
    assert ours.shape == (1, 96, 128, 3) and diff < TOLERANCE
    other = generate(*parts, prompt="a red fox in fresh snow, morning light", **{**kw, "seed": 1235})
    assert (other - expected).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("distilled", [True, False])
def test_klein_text_to_image_from_gguf_equals_flux2kleinpipeline(distilled, tiny_vae, tmp_path):
    klein = build_tiny_klein(seed=2)
    model, tokenizer = build_tiny_qwen3(seed=3)
    te_path, t_path = str(tmp_path / "qwen3-Q5_0.gguf"), str(tmp_path / "klein-Q4_0.gguf")
    te_ref = dequantized_text_model(model, save_tiny_text_encoder_gguf(model, tokenizer, te_path, arch="qwen3",
                                                                       ggml_type="Q5_0"))
    t_ref = dequantized_transformer(klein, save_tiny_transformer_gguf(klein, t_path, "Q4_0", is_distilled=distilled))
    pipe = Flux2KleinPipeline(scheduler=scheduler(), vae=tiny_vae[0], text_encoder=te_ref, tokenizer=tokenizer,
                              transformer=t_ref, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    transformer = load_transformer(t_path, device="cpu", dtype=torch.float32)
    assert transformer.distilled is distilled  # read from the GGUF's own metadata
    parts = (transformer, load_text_encoder(te_path), load_vae(tiny_vae[1], device="cpu"))
    kw = dict(width=64, height=64, num_inference_steps=2, guidance=4.0, seed=7)
    ours, expected = run_both(pipe, parts, "a lighthouse at dusk", **kw)
    diff = (ours - expected).abs().max().item()
    print(f"[klein] {'distilled' if distilled else 'base'} GGUF text-to-image: max abs diff {diff:.2e}")
    assert diff < TOLERANCE
