"""Cached references: FLUX.2 [klein] 9B KV against diffusers' Flux2KleinKVPipeline (cached or not, across runs),
the cache's key and lifetime, and ComfyUI's FluxKVCache approximation for other models."""

import copy
import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline

from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
from flux2kit.pipelines.demo_models.transformer import KLEIN_TEXT_WIDTHS, build_tiny_klein, save_transformer
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.generation.generate import generate
from flux2kit.pipelines.generation.references import encode_references
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.models.vae import load_vae

TOLERANCE = 2e-5  # max abs difference of [0, 1] pixels, fp32 on both sides (summation order only)
PROMPT = "the cat from image 1 wearing the hat from image 2"
W, H = 128, 96


def _photo(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    c = rng.uniform(0.2, 0.8, size=3)
    img = np.stack([(x / w) * c[0], (y / h) * c[1], ((x + y) / (w + h)) * c[2]], axis=-1)
    img[(x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 4) ** 2] = rng.uniform(0, 1, size=3)
    return PIL.Image.fromarray((img * 255).astype(np.uint8))


REFS = [_photo(128, 96, 1), _photo(96, 64, 2)]


class Calls:
    """What the transformer was asked: one entry per forward (KV mode, image-side tokens)."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.seen.append((kwargs.get("kv_cache_mode"), kwargs["hidden_states"].shape[1]))

    def close(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def kv_parts(tmp_path_factory, tiny_vae):
    """The tiny [klein] saved as a KV model's diffusers folder (model_index.json names Flux2KleinKVPipeline)."""
    klein = build_tiny_klein(seed=3, size="4b")
    qwen, tokenizer = build_tiny_qwen3(seed=0, hidden_size=KLEIN_TEXT_WIDTHS["4b"] // 3)
    root = tmp_path_factory.mktemp("klein_kv")
    save_tiny_qwen3(qwen, tokenizer, str(root / "qwen3"), layout="pipeline")
    folder = save_transformer(klein, str(root / "klein-kv"), "diffusers")
    with open(root / "klein-kv" / "model_index.json", "w", encoding="utf-8") as f:
        json.dump({"_class_name": "Flux2KleinKVPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"]}, f)
    single = save_transformer(klein, str(root / "klein.safetensors"), "bfl", is_distilled=True)
    vae = load_vae(tiny_vae[1], device="cpu")
    return dict(klein=klein, qwen=qwen, tokenizer=tokenizer, vae_model=tiny_vae[0], vae=vae,
                kv=load_transformer(folder, device="cpu"), single=single,
                text_encoder=load_text_encoder(str(root / "qwen3"), device="cpu"))


def diffusers_kv(parts, prompt, seed, steps=3, refs=REFS, width=W, height=H):
    """Flux2KleinKVPipeline on a copy of the tiny [klein] (the pipeline replaces its attention processors)."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = Flux2KleinKVPipeline(scheduler=scheduler, vae=parts["vae_model"], text_encoder=parts["qwen"],
                                tokenizer=parts["tokenizer"], transformer=copy.deepcopy(parts["klein"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe(image=refs, prompt=prompt, height=height, width=width, num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images.permute(0, 2, 3, 1)


def ours(parts, transformer, prompt, seed, mode="auto", steps=3, refs=REFS, width=W, height=H, notes=None):
    return generate(transformer, parts["text_encoder"], parts["vae"], prompt=prompt, images=refs, width=width,
                    height=height, num_inference_steps=steps, seed=seed, reference_cache=mode, notes=notes)


def test_the_kv_model_is_told_apart_by_its_folder_or_the_loader(kv_parts):
    assert kv_parts["kv"].reference_kv and kv_parts["kv"].distilled and kv_parts["kv"].name.endswith("KV")
    plain = load_transformer(kv_parts["single"], device="cpu")  # a single file that says only "distilled"
    assert not plain.reference_kv and plain.distilled
    assert load_transformer(kv_parts["single"], device="cpu", klein_mode="kv").reference_kv


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_kv_model_matches_diffusers_flux2_klein_kv_pipeline(kv_parts, mode):
    kv = kv_parts["kv"]
    kv.caches.clear()
    expected = diffusers_kv(kv_parts, PROMPT, seed=4)
    calls = Calls(kv.model)
    try:
        got = ours(kv_parts, kv, PROMPT, seed=4, mode=mode)
    finally:
        calls.close()
    diff = (got - expected).abs().max().item()
    print(f"[klein] KV reference_cache={mode}: max abs diff {diff:.2e}")
    assert diff < TOLERANCE, diff
    image_tokens, ref_tokens = (H // 16) * (W // 16), (96 // 16) * (128 // 16) + (64 // 16) * (96 // 16)
    if mode == "auto":  # references only in the first forward; then their cached K/V
        assert calls.seen == [("extract", ref_tokens + image_tokens)] + [("cached", image_tokens)] * 2
    else:
        assert calls.seen == [("extract", ref_tokens + image_tokens)] * 3
    # The attention processors are the model's own again afterwards.
    assert type(kv.model.transformer_blocks[0].attn.processor).__name__ == "Flux2AttnProcessor"
    # Not vacuous: the KV model's references differ from plain [klein]'s (refs at t, full attention); on these
    # tiny random weights by little in pixels, but far above the parity difference.
    plain = load_transformer(kv_parts["single"], device="cpu")
    plain_diff = (ours(kv_parts, plain, PROMPT, seed=4) - expected).abs().max().item()
    print(f"plain [klein] vs the KV pipeline: max abs diff {plain_diff:.2e}")
    assert plain_diff > max(1e-4, 20 * diff)


def test_the_cache_survives_runs_that_change_only_prompt_seed_or_size(kv_parts):
    kv = kv_parts["kv"]
    kv.caches.clear()
    first = []
    ours(kv_parts, kv, PROMPT, seed=1, notes=first)
    assert any("computed at the first step (kept for the next runs)" in n for n in first), first
    for prompt, seed, (w, h) in [("a different prompt", 1, (W, H)), (PROMPT, 9, (W, H)), (PROMPT, 1, (64, 80))]:
        notes = []
        calls = Calls(kv.model)
        try:
            cached = ours(kv_parts, kv, prompt, seed=seed, width=w, height=h, notes=notes)
        finally:
            calls.close()
        assert all(mode == "cached" for mode, _ in calls.seen), calls.seen  # not even the first step re-extracts
        assert any("reused from an earlier run" in n for n in notes), notes
        uncached = ours(kv_parts, kv, prompt, seed=seed, width=w, height=h, mode="off")
        assert (cached - uncached).abs().max().item() < TOLERANCE


def test_the_cache_key_holds_what_changes_the_cache(kv_parts, monkeypatch):
    kv = kv_parts["kv"]
    kv.caches.clear()
    ours(kv_parts, kv, PROMPT, seed=1, steps=1)
    store = kv.caches["reference_kv"]
    assert len(store) == 1
    ours(kv_parts, kv, PROMPT, seed=1, steps=1, refs=REFS[::-1])  # other references (here: another order)
    assert len(store) == 2
    # The model's cache_key() is the hook for whatever changes the weights (e.g. LoRA strengths).
    monkeypatch.setattr(type(kv), "cache_key", lambda self: ("lora", 0.8))
    notes = []
    ours(kv_parts, kv, PROMPT, seed=1, steps=1, notes=notes)
    assert any("computed" in n for n in notes) and len(store) == 2  # a miss; at most two entries are kept
    monkeypatch.undo()
    # Moving the model drops what was computed on the old device.
    kv.device = torch.device("meta")
    kv.to("cpu")
    assert not kv.caches


def test_loras_act_on_the_cached_references_and_key_the_kept_cache(kv_parts, tmp_path):
    """A LoRA'd KV model (FLUX.2 Load LoRA's variant of the shared base): the cached path runs the LoRA like the
    uncached one, and each stack (file, strength) keeps its own K/V, never the base's or another strength's."""
    from flux2kit.pipelines.demo_models.lora import random_lora, save_lora
    from flux2kit.pipelines.files.lora_formats import read_lora
    from flux2kit.pipelines.models.lora import LoraEntry, apply_loras

    kv = kv_parts["kv"]
    kv.caches.clear()
    lora = read_lora(save_lora(random_lora(dict(kv.model.config), rank=4, seed=5, std=0.1),
                               str(tmp_path / "kv_lora.safetensors")))
    plain = ours(kv_parts, kv, PROMPT, seed=4, steps=2)  # the base's K/V, kept
    for strength in (1.0, 0.5):
        variant, notes = apply_loras(kv, [LoraEntry(lora, strength)]), []
        cached = ours(kv_parts, variant, PROMPT, seed=4, steps=2, notes=notes)
        assert any("computed at the first step" in n for n in notes), (strength, notes)  # not the base's, nor 1.0's
        uncached = ours(kv_parts, variant, PROMPT, seed=4, steps=2, mode="off")
        diff, effect = (cached - uncached).abs().max().item(), (cached - plain).abs().max().item()
        print(f"LoRA at {strength}: cached vs uncached {diff:.2e}; the LoRA's own effect {effect:.2e}")
        assert diff < TOLERANCE and effect > 100 * max(diff, 1e-7)
        again = []
        reused = ours(kv_parts, variant, PROMPT, seed=4, steps=2, notes=again)  # no step sees the references
        assert (reused - uncached).abs().max().item() < TOLERANCE
        assert any("reused from an earlier run" in n for n in again), again
    assert len(kv.caches["reference_kv"]) == 2  # at most two kept per base model


def test_equal_references_reuse_the_cache_whatever_object_carries_them(kv_parts):
    from flux2kit.pipelines.generation.reference_cache import references_digest

    with torch.inference_mode():
        a = encode_references(kv_parts["vae"], REFS)
        b = encode_references(kv_parts["vae"], [r.copy() for r in REFS])
        c = encode_references(kv_parts["vae"], REFS[:1])
    assert references_digest(a) == references_digest(b) != references_digest(c)


# ---------------------------------------------------------------------------------------------
# Other models: ComfyUI's FluxKVCache approximation


@pytest.fixture(scope="module")
def dev_parts(transformer_files, tiny_text_encoder, tiny_vae):
    return dict(transformer=load_transformer(transformer_files["bfl"], device="cpu"),
                text_encoder=load_text_encoder(tiny_text_encoder[2], device="cpu"),
                vae=load_vae(tiny_vae[1], device="cpu"))


def test_approximation_extracts_once_per_run_and_keeps_nothing(dev_parts):
    t = dev_parts["transformer"]
    calls = Calls(t.model)
    notes = []
    try:
        out = ours(dev_parts, t, PROMPT, seed=2, mode="approximate", steps=4, notes=notes)
    finally:
        calls.close()
    image_tokens, ref_tokens = 48, 48 + 24
    assert calls.seen == [("extract", ref_tokens + image_tokens)] + [("cached", image_tokens)] * 3
    assert not t.caches.get("reference_kv") and any("FluxKVCache" in n for n in notes)
    assert any("computed at the first step" in n and "kept" not in n for n in notes)
    # The auto mode leaves other models alone: exactly the uncached picture.
    assert torch.equal(ours(dev_parts, t, PROMPT, seed=2, steps=4), ours(dev_parts, t, PROMPT, seed=2, mode="off",
                                                                           steps=4))
    assert out.shape == (1, H, W, 3)


def test_approximation_changes_the_picture_by_a_measured_amount(dev_parts):
    """The numbers in README "Cached references" (tiny random [dev], 2 references, 4 steps): the approximation's
    change against what the references themselves change (the tiny random model follows them only weakly)."""
    t = dev_parts["transformer"]
    exact = ours(dev_parts, t, PROMPT, seed=2, mode="off", steps=4)
    approx = ours(dev_parts, t, PROMPT, seed=2, mode="approximate", steps=4)
    no_refs = ours(dev_parts, t, PROMPT, seed=2, mode="off", steps=4, refs=[])
    diff, refs_effect = (approx - exact).abs().mean().item(), (no_refs - exact).abs().mean().item()
    print(f"approximate vs uncached: mean |diff| {diff:.2e}, max {(approx - exact).abs().max().item():.2e}; "
          f"the references' own effect: mean {refs_effect:.2e} (ratio {diff / refs_effect:.3f})")
    assert 1e-5 < diff < 0.25 * refs_effect


def test_the_cached_step_equals_the_extracting_step_it_came_from(dev_parts):
    """Splicing the cached K/V back in reproduces the extracting forward for the same input (both modes)."""
    from flux2kit.pipelines.generation.sampling import latent_ids, text_ids
    from flux2kit.pipelines.models.reference_kv import forward_cached, forward_extract, reference_kv_processors

    t = dev_parts["transformer"]
    g = torch.Generator().manual_seed(0)
    x, refs = torch.randn(1, 12, 128, generator=g), torch.randn(1, 20, 128, generator=g)
    text = torch.randn(1, 16, t.text_width, generator=g)
    ref_ids = torch.cat([latent_ids(1, 4, 5)[..., :1] + 10, latent_ids(1, 4, 5)[..., 1:]], dim=-1)
    args = (x, latent_ids(1, 3, 4), text, text_ids(1, 16), torch.tensor([0.7]), torch.tensor([4.0]))
    with torch.inference_mode(), reference_kv_processors(t.model):
        out, gaps = {}, []
        for attention in ("self", "full"):
            out[attention], cache = forward_extract(t, *args, refs, ref_ids, ref_attention=attention, shared_refs=True)
            gaps.append((forward_cached(t, *args, cache) - out[attention]).abs().max().item())
        plain = t(torch.cat([x, refs], 1), torch.cat([args[1], ref_ids], 1), text, args[3], args[4], args[5])[:, :12]
    assert max(gaps) < 1e-5, gaps
    # Not vacuous: the two ways of attending, and the plain forward (references at the current timestep), differ.
    assert (out["self"] - out["full"]).abs().max() > 10 * max(max(gaps), 1e-6)
    assert (plain - out["full"]).abs().max() > 10 * max(max(gaps), 1e-6)


def test_bad_reference_cache_is_refused():
    from flux2kit.pipelines.generation.request import GenerationRequest

    with pytest.raises(Flux2KitError, match="Unknown reference_cache 'always'"):
        GenerationRequest(prompt="x", reference_cache="always").check()


def test_approximate_without_references_notes_and_runs_normally(dev_parts, caplog):
    t = dev_parts["transformer"]
    notes = []
    with caplog.at_level(logging.INFO, logger="flux2kit"):
        out = ours(dev_parts, t, "a fox", seed=1, mode="approximate", refs=[], steps=2, notes=notes)
    assert any("no references to cache" in n for n in notes)
    assert torch.equal(out, ours(dev_parts, t, "a fox", seed=1, refs=[], steps=2))
