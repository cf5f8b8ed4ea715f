"""Image-to-image and inpainting in the engine, against diffusers: its FLUX.2 [klein] inpaint pipeline, and a
reference loop written from diffusers' own pieces (FlowMatchEulerDiscreteScheduler's truncated timesteps and
``scale_noise``, Flux2Pipeline's encoders and id helpers) for [dev], which has no img2img pipeline."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinInpaintPipeline, Flux2Pipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.utils.torch_utils import randn_tensor
from transformers import Mistral3ForConditionalGeneration

from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
from flux2kit.pipelines.demo_models.transformer import KLEIN_TEXT_WIDTHS, build_tiny_klein, save_transformer
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.generation.editing import Edit, fit_mask, latent_mask
from flux2kit.pipelines.generation.generate import generate, sample
from flux2kit.pipelines.generation.sampling import denoise_schedule, get_schedule
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.models.vae import load_vae

# fp32 on both sides; the differences are summation order only (our fused q|k|v matmul), as in the
# text-to-image parity tests (measured there: 0 to 3e-6).
TOLERANCE = 2e-5  # max abs difference of [0, 1] pixel values
PROMPT = "a red fox in fresh snow, morning light"
W, H = 128, 96  # multiples of 16, well under 1 MP: no resize and no crop on either side


def _photo(w, h, seed):
    """A smooth test picture with a disc (uint8 RGB), like the text-to-image parity tests'."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    c = rng.uniform(0.2, 0.8, size=3)
    img = np.stack([(x / w) * c[0], (y / h) * c[1], ((x + y) / (w + h)) * c[2]], axis=-1)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, min(w, h) / 4
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, size=3)
    return PIL.Image.fromarray((img * 255).astype(np.uint8))


def _mask(w=W, h=H, box=(20, 60, 30, 90)):
    """An 8-bit mask: white (repaint) inside ``box`` (y0, y1, x0, x1), edges not on 16-pixel cells."""
    m = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    return PIL.Image.fromarray(m)


def _pixels(pil):
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)


def _mask_array(pil):
    return np.asarray(pil, dtype=np.float32) / 255.0


def ksampler_to_diffusers(steps: int, denoise: float) -> tuple[int, float]:
    """(num_inference_steps, strength) with which diffusers runs exactly ComfyUI KSampler's ``steps`` steps."""
    if denoise > 0.9999:
        return steps, 1.0
    n = int(steps / denoise)
    return n, (steps - 0.5) / n


# ---------------------------------------------------------------------------------------------
# The schedule


@pytest.mark.parametrize("steps, denoise", [(4, 1.0), (4, 0.5), (3, 0.6), (14, 0.54), (28, 0.75), (1, 0.3)])
def test_denoise_schedule_is_diffusers_truncated_schedule(steps, denoise):
    seq = 48
    n, strength = ksampler_to_diffusers(steps, denoise)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sched.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=compute_empirical_mu(seq, n))
    t_start = int(max(n - min(n * strength, n), 0))  # diffusers' get_timesteps
    ours = denoise_schedule(steps, denoise, seq)
    assert len(ours) == steps + 1 == len(sched.sigmas[t_start:])
    assert torch.equal(ours, sched.sigmas[t_start:])
    assert torch.equal(ours, get_schedule(n, seq)[n - steps:])  # KSampler: the last steps + 1 of N's schedule


def test_the_strength_mapping_runs_exactly_the_ksampler_steps():
    """diffusers runs ceil(N * strength) steps give or take float error; (steps - 0.5) / N lands on ``steps``."""
    for steps in range(1, 51):
        for denoise in np.arange(0.01, 1.0, 0.01):
            n, strength = ksampler_to_diffusers(steps, float(denoise))
            if n > 1000:
                continue
            assert n - int(max(n - min(n * strength, n), 0)) == steps, (steps, denoise)


def test_denoise_zero_is_an_empty_schedule():
    assert len(denoise_schedule(4, 0.0, 16)) == 0


# ---------------------------------------------------------------------------------------------
# [klein]: parity with diffusers' Flux2KleinInpaintPipeline


@pytest.fixture(scope="module")
def klein_parts(tmp_path_factory, tiny_vae):
    """diffusers' modules and ours loaded from files: tiny [klein] 4B-like, its tiny Qwen3, the tiny VAE."""
    klein = build_tiny_klein(seed=3, size="4b")
    qwen, tokenizer = build_tiny_qwen3(seed=0, hidden_size=KLEIN_TEXT_WIDTHS["4b"] // 3)
    root = tmp_path_factory.mktemp("klein_edit")
    save_tiny_qwen3(qwen, tokenizer, str(root / "qwen3"), layout="pipeline")
    path = save_transformer(klein, str(root / "klein.safetensors"), "bfl")
    return dict(
        klein=klein, qwen=qwen, tokenizer=tokenizer, vae_model=tiny_vae[0],
        distilled=load_transformer(path, device="cpu", klein_mode="distilled"),
        base=load_transformer(path, device="cpu", klein_mode="base"),
        text_encoder=load_text_encoder(str(root / "qwen3"), device="cpu"),
        vae=load_vae(tiny_vae[1], device="cpu"),
    )


def _inpaint_pipe(parts, distilled):
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = Flux2KleinInpaintPipeline(scheduler=scheduler, vae=parts["vae_model"], text_encoder=parts["qwen"],
                                     tokenizer=parts["tokenizer"], transformer=parts["klein"], is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("steps, denoise, n_refs, mode", [
    (3, 0.3, 0, "distilled"),  # diffusers strength 0.25
    (3, 0.6, 1, "distilled"),  # 0.5
    (4, 1.0, 0, "distilled"),  # 1.0: from pure noise, the mask still keeps the rest
    (2, 0.5, 1, "base"),  # classifier-free guidance: the negative pass sees the same references
])
def test_inpaint_matches_diffusers_flux2_klein_inpaint_pipeline(klein_parts, steps, denoise, n_refs, mode):
    image, mask = _photo(W, H, 7), _mask()
    reference = _photo(160, 96, 1) if n_refs else None
    guidance = 4.0 if mode == "base" else 1.0
    n, strength = ksampler_to_diffusers(steps, denoise)
    calls = []
    klein = klein_parts["klein"]
    hook = klein.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["timestep"][0].item()), with_kwargs=True)
    try:
        expected = _inpaint_pipe(klein_parts, mode == "distilled")(
            prompt=PROMPT, image=image, mask_image=mask, image_reference=reference, strength=strength,
            num_inference_steps=n, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(5),
            output_type="pt").images.permute(0, 2, 3, 1)
    finally:
        hook.remove()
    assert len(calls) == steps * (2 if mode == "base" else 1)  # exactly the KSampler's step count
    ours = generate(klein_parts[mode], klein_parts["text_encoder"], klein_parts["vae"], prompt=PROMPT,
                    images=[reference] if reference is not None else [], start_image=image, mask=_mask_array(mask),
                    denoise=denoise, num_inference_steps=steps, guidance=guidance, seed=5,
                    source_as_reference=True, paste_back=False)
    assert ours.shape == expected.shape == (1, H, W, 3)
    diff = (ours - expected).abs().max().item()
    print(f"[klein] {mode} inpaint steps={steps} denoise={denoise} refs={n_refs}: max abs diff {diff:.2e}")
    assert diff < TOLERANCE, diff
    # Not vacuous: the masked area changed, and another seed changes it differently.
    src = _pixels(image)
    inside = torch.from_numpy(_mask_array(mask)) >= 0.5
    assert (ours[0][inside] - src[inside]).abs().mean() > 0.02
    other = generate(klein_parts[mode], klein_parts["text_encoder"], klein_parts["vae"], prompt=PROMPT,
                     images=[reference] if reference is not None else [], start_image=image,
                     mask=_mask_array(mask), denoise=denoise, num_inference_steps=steps, guidance=guidance, seed=6,
                     paste_back=False)
    assert (other - expected).abs().max().item() > 100 * TOLERANCE


# ---------------------------------------------------------------------------------------------
# [dev]: a reference loop from diffusers' scheduler pieces


@pytest.fixture(scope="module")
def dev_parts(transformer_files, tiny_transformer, tiny_text_encoder, tiny_vae):
    _, tokenizer, folder = tiny_text_encoder
    mistral = Mistral3ForConditionalGeneration.from_pretrained(f"{folder}/text_encoder", torch_dtype=torch.float32)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae[0], text_encoder=mistral,
                         tokenizer=tokenizer, transformer=tiny_transformer)
    return dict(pipe=pipe, transformer=load_transformer(transformer_files["bfl"], device="cpu"),
                text_encoder=load_text_encoder(folder, device="cpu"), vae=load_vae(tiny_vae[1], device="cpu"))


def reference_edit(pipe, image, *, steps, denoise, seed, guidance, mask=None, source_as_reference=True):
    """Image-to-image / inpaint written from diffusers' pieces: the truncated timesteps and ``scale_noise`` of
    FlowMatchEulerDiscreteScheduler, Flux2Pipeline's prompt/VAE encoders and position ids, its transformer."""
    embeds, text_ids = pipe.encode_prompt(prompt=PROMPT, device="cpu")
    w, h = image.size
    x0 = pipe._encode_vae_image(pipe.image_processor.preprocess(image, height=h, width=w), None)
    n, strength = ksampler_to_diffusers(steps, denoise)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sched.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=compute_empirical_mu(x0.shape[2] * x0.shape[3], n))
    t_start = int(max(n - min(n * strength, n), 0))
    timesteps = sched.timesteps[t_start:]
    sched.set_begin_index(t_start)
    noise = randn_tensor(x0.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    latents = pipe._pack_latents(sched.scale_noise(x0, timesteps[:1], noise))
    ids = pipe._prepare_latent_ids(x0)
    refs = None
    if source_as_reference:
        refs = pipe._pack_latents(x0)
        ids = torch.cat([ids, pipe._prepare_image_ids([x0])], dim=1)
    packed_mask = None
    if mask is not None:
        processor = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True,
                                      do_convert_grayscale=True)
        m = F.interpolate(processor.preprocess(mask, height=h, width=w), size=x0.shape[2:], mode="bilinear")
        packed_mask = pipe._pack_latents(m)
    n_img = latents.shape[1]
    for i, t in enumerate(timesteps):
        x = latents if refs is None else torch.cat([latents, refs], dim=1)
        v = pipe.transformer(hidden_states=x, timestep=t.expand(1) / 1000, guidance=torch.full((1,), guidance),
                             encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        latents = sched.step(v[:, :n_img], t, latents, return_dict=False)[0]
        if packed_mask is not None:
            kept = x0
            if i < len(timesteps) - 1:
                kept = sched.scale_noise(x0, torch.tensor([timesteps[i + 1]]), noise)
            latents = (1 - packed_mask) * pipe._pack_latents(kept) + packed_mask * latents
    latents = pipe._unpack_latents_with_ids(latents, pipe._prepare_latent_ids(x0))
    bn = pipe.vae.bn
    latents = latents * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps) \
        + bn.running_mean.view(1, -1, 1, 1)
    pixels = pipe.vae.decode(pipe._unpatchify_latents(latents), return_dict=False)[0]
    return ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


@pytest.mark.parametrize("steps, denoise, masked, source", [
    (3, 0.6, False, False),  # image-to-image, the start image only as the start
    (3, 0.6, False, True),  # image-to-image with the start image as a reference too
    (2, 0.35, True, True),  # inpaint
    (3, 1.0, True, True),  # inpaint from pure noise
])
def test_dev_edit_matches_a_loop_from_diffusers_scheduler_pieces(dev_parts, steps, denoise, masked, source):
    image = _photo(W, H, 11)
    mask = _mask() if masked else None
    with torch.no_grad():
        expected = reference_edit(dev_parts["pipe"], image, steps=steps, denoise=denoise, seed=3, guidance=4.0,
                                  mask=mask, source_as_reference=source)
    ours = generate(dev_parts["transformer"], dev_parts["text_encoder"], dev_parts["vae"], prompt=PROMPT,
                    start_image=image, mask=None if mask is None else _mask_array(mask), denoise=denoise,
                    num_inference_steps=steps, guidance=4.0, seed=3, source_as_reference=source, paste_back=False)
    diff = (ours - expected).abs().max().item()
    print(f"[dev] edit steps={steps} denoise={denoise} mask={masked} source-ref={source}: max abs diff {diff:.2e}")
    assert diff < TOLERANCE, diff
    assert (ours[0] - _pixels(image)).abs().mean() > 0.02  # it did change the picture


# ---------------------------------------------------------------------------------------------
# Behaviour


def test_denoise_one_without_source_reference_is_text_to_image(dev_parts):
    """Start latents at denoise 1 are pure noise: the picture equals text-to-image at the same seed and size."""
    p = dev_parts
    kw = dict(prompt=PROMPT, num_inference_steps=2, guidance=4.0, seed=9)
    edit = generate(p["transformer"], p["text_encoder"], p["vae"], start_image=_photo(W, H, 2), denoise=1.0,
                    source_as_reference=False, **kw)
    plain = generate(p["transformer"], p["text_encoder"], p["vae"], width=W, height=H, **kw)
    assert torch.equal(edit, plain)


def test_denoise_zero_and_an_empty_mask_return_the_input_unchanged(dev_parts, caplog):
    p = dev_parts
    image = _photo(W + 5, H + 7, 4)  # cropped to 128x96 around the centre, as ComfyUI's VAE Encode does
    src = _pixels(image)[3:3 + H, 2:2 + W]
    with caplog.at_level(logging.INFO, logger="flux2kit"):
        out = generate(p["transformer"], p["text_encoder"], p["vae"], prompt=PROMPT, start_image=image, denoise=0.0,
                       num_inference_steps=3, batch_size=2)
    assert out.shape == (2, H, W, 3) and torch.equal(out[1], src) and "denoise is 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flux2kit"):
        out = generate(p["transformer"], p["text_encoder"], p["vae"], prompt=PROMPT, start_image=image,
                       mask=np.zeros((H + 7, W + 5), np.float32), num_inference_steps=3)
    assert torch.equal(out[0], src) and "The mask is empty" in caplog.text


def test_paste_back_keeps_untouched_pixels_bit_exact(dev_parts):
    p = dev_parts
    image, mask = _photo(W, H, 5), _mask()
    kw = dict(prompt=PROMPT, start_image=image, mask=_mask_array(mask), denoise=0.8, num_inference_steps=2, seed=1)
    pasted = generate(p["transformer"], p["text_encoder"], p["vae"], **kw)
    raw = generate(p["transformer"], p["text_encoder"], p["vae"], paste_back=False, **kw)
    inside = torch.from_numpy(_mask_array(mask)) >= 0.5
    src = _pixels(image)
    assert torch.equal(pasted[0][~inside], src[~inside])
    assert torch.equal(pasted[0][inside], raw[0][inside])
    assert (raw[0][~inside] - src[~inside]).abs().max() > 1e-3  # the VAE alone would not keep them exact


def test_crop_and_stitch_samples_only_the_masks_box(dev_parts):
    """With a margin, only the mask's box (plus the margin) is sampled, with the box as the source reference;
    outside the box the latents are the start's, and paste-back keeps every pixel outside the mask."""
    from flux2kit.pipelines.generation.editing import encode_start

    p = dev_parts
    image = _photo(192, 160, 8)
    # Masked cells (a cell reads the pixels at its centre, 16 i + 7.5): rows 4-5, columns 5-6; with a 16-pixel
    # margin (one cell) the box is rows 3-6 and columns 4-7.
    mask = _mask_array(_mask(192, 160, (70, 100, 80, 110)))
    calls = []
    hook = p["transformer"].model.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["hidden_states"].shape[1]), with_kwargs=True)
    try:
        stitched = generate(p["transformer"], p["text_encoder"], p["vae"], prompt=PROMPT, start_image=image,
                            mask=mask, crop_margin=16, denoise=0.7, num_inference_steps=2, seed=4)
    finally:
        hook.remove()
    assert calls == [2 * 4 * 4] * 2  # the 4x4-cell box and its source reference, nothing else
    src = _pixels(image)
    assert torch.equal(stitched[0][torch.from_numpy(mask) < 0.5], src[torch.from_numpy(mask) < 0.5])
    start = encode_start(p["vae"], src[None])
    latents = sample(p["transformer"], p["text_encoder"].encode(PROMPT).embeds, None, width=0, height=0,
                     num_inference_steps=2, guidance=4.0, seed=4,
                     edit=Edit(start, denoise=0.7, mask=torch.from_numpy(mask)[None], crop_margin=16))
    box = torch.zeros_like(latents, dtype=torch.bool)
    box[..., 3:7, 4:8] = True
    assert torch.equal(latents[~box], start[~box])
    assert (latents[box] - start[box]).abs().max() > 0.1


def test_batch_item_i_is_seed_plus_i(dev_parts):
    p = dev_parts
    kw = dict(prompt=PROMPT, start_image=_photo(64, 64, 3), denoise=0.5, num_inference_steps=2)
    batch = generate(p["transformer"], p["text_encoder"], p["vae"], seed=10, batch_size=3, **kw)
    single = generate(p["transformer"], p["text_encoder"], p["vae"], seed=12, **kw)
    torch.testing.assert_close(batch[2:3], single, rtol=0, atol=1e-5)


def test_masks_binarize_then_resize_to_the_latent_grid():
    """A cell reads the two pixels at its centre (16 i + 7 and + 8): 0/1 there, 0.5 where an edge falls between."""
    m = torch.zeros(1, 32, 48)
    m[:, 4:12, 20:28] = 0.6  # above 0.5: binarized to 1; covers cell (0, 1)'s centre
    m[:, 0:12, 0:12] = 0.4  # below: 0
    m[:, 24:32, 32:48] = 1.0  # cell (1, 2)'s centre rows are 23 and 24: half covered
    grid = latent_mask(m, (2, 3))
    assert grid.shape == (1, 1, 2, 3)
    assert grid.flatten().tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.5]
    soft = latent_mask(m, (2, 3), "soft")
    assert soft[0, 0, 0, 1].item() == pytest.approx(0.6) and soft[0, 0, 0, 0].item() == pytest.approx(0.4)


def test_a_mask_of_the_uncropped_image_gets_the_same_crop():
    m = torch.zeros(1, 100, 130)
    m[:, 2, 1] = 1.0  # the first pixel that survives the crop to 96x128 (offsets 2 and 1)
    fitted = fit_mask(m, 128, 96)
    assert fitted.shape == (1, 96, 128) and fitted[0, 0, 0] == 1.0 and fitted.sum() == 1.0


@pytest.mark.parametrize("change, message", [
    (dict(mask=np.ones((50, 50), np.float32)), r"mask is 50x50 .* image is 128x96 .* does not belong"),
    (dict(start_image=_photo(2100, 2100, 1)), r"2096x2096 \(4\.19 MP\)|over FLUX.2's 4 MP maximum"),
    (dict(start_image=_photo(48, 64, 1)), r"each side must be 64-4096"),
    (dict(denoise=1.5), r"denoise must be 0-1, got 1.5"),
    (dict(denoise=-0.1), r"denoise must be 0-1"),
    (dict(denoise=0.0005), r"so small that no step would change the image.*at least 0.002"),
    (dict(start_image=None, mask=np.ones((96, 128), np.float32)), r"A mask needs a start image"),
    (dict(start_image=None, denoise=0.5, mask=None), r"denoise 0.5 needs a start image"),
    (dict(batch_size=2, start_image=torch.rand(3, 96, 128, 3)), r"start holds 3 images but batch_size is 2"),
    (dict(mask_mode="feathered"), r"Unknown mask_mode 'feathered'"),
    (dict(prompt="put image 3 in the sky"), r"image 3"),  # the start image is image 1 and the reference image 2
])
def test_bad_edit_requests_are_refused_before_any_model_runs(change, message):
    from flux2kit.pipelines.generation.request import GenerationRequest

    request = dict(prompt=PROMPT, images=(_photo(64, 64, 1),), start_image=_photo(W, H, 1),
                   mask=np.ones((H, W), np.float32), denoise=0.5, num_inference_steps=2) | change
    with pytest.raises(Flux2KitError, match=message):
        GenerationRequest(**request).check()


def test_image_two_is_the_first_reference_when_the_start_image_is_image_one():
    from flux2kit.pipelines.generation.request import GenerationRequest

    job = GenerationRequest(prompt="the hat from image 2 on the cat in image 1", images=(_photo(64, 64, 1),),
                            start_image=_photo(W, H, 1), denoise=0.5, num_inference_steps=2).check()
    assert (job.width, job.height) == (W, H)  # the start image's size wins
    with pytest.raises(Flux2KitError, match="image 2"):
        GenerationRequest(prompt="the hat from image 2", images=(_photo(64, 64, 1),), start_image=_photo(W, H, 1),
                          source_as_reference=False).check()


@pytest.mark.parametrize("channels, name", [(4, "Stable Diffusion"), (16, "SD3 or FLUX.1"), (32, "before patchifying")])
def test_a_latent_of_another_model_is_named(dev_parts, channels, name):
    with pytest.raises(Flux2KitError, match=name):
        sample(dev_parts["transformer"], torch.zeros(1, 512, 384), None, width=0, height=0, num_inference_steps=2,
               guidance=4.0, seed=0, edit=Edit(torch.randn(1, channels, 8, 8)))
