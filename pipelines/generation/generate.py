"""Text (and references, or a start image to edit) to image, the stages in the order they run:
check the request -> encode prompt -> encode references (and the start image) -> noise -> denoise -> decode
(-> paste the result back over the start image outside the mask).

Each stage is usable on its own (the Sampler and Decode nodes call them one by one); ``generate``
is the one path through all of them, used by the Generate node, the command line and the parity tests.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from ..models.reference_kv import reference_kv_processors
from ..parameters import DEFAULTS, check_denoise, check_generation, make_noise
from .editing import (
    Edit,
    batch_of,
    check_latent,
    check_start_size,
    edit_batch_size,
    edit_outcome,
    encode_start,
    latent_mask,
    mask_box,
    paste_back,
)
from .passes import ModelPass
from .reference_cache import plan_references
from .references import References, encode_references, join_references, latent_references
from .request import CheckedRequest, GenerationRequest, check_text_encoder_fits
from .sampling import StepCallback, denoise, denoise_schedule, get_schedule

log = logging.getLogger("flux2kit")


def latents_to_images(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) in [0, 1], fp32 on the CPU."""
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu()


def generate(
    transformer,
    text_encoder,
    vae,
    request: GenerationRequest | CheckedRequest | None = None,
    *,
    prompt_embeds=None,
    negative_embeds: torch.Tensor | None = None,
    encode: Callable | None = None,
    prepare: Callable | None = None,
    offload_text_encoder: bool = False,
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    notes: list | None = None,
    **params,
) -> torch.Tensor:
    """Make the request's images; returns a ComfyUI IMAGE tensor (B, H, W, 3) in [0, 1].

    ``request`` (or the same fields as keyword arguments: prompt, images, aspect_ratio, ...) is checked
    first unless it already was. ``prompt_embeds`` (the prompt already encoded: a tensor or a
    ``PromptEmbeds``) lets a caller free the text encoder before the transformer loads;
    ``text_encoder`` may then be None ([klein] base then needs ``negative_embeds``, the empty prompt's
    embeddings, too). ``encode(prompt)`` replaces ``text_encoder.encode`` (e.g. a cached encoder);
    ``prepare(model)`` runs before each model is used (e.g. to move it onto the GPU). ``notes`` (a list)
    receives what the user should know about the run (an empty mask, the reference cache, ...).
    """
    if request is None:
        request = GenerationRequest(**params)
    elif params:
        raise TypeError(f"generate() takes a request or its fields, not both ({', '.join(params)})")
    job = request if isinstance(request, CheckedRequest) else request.check()
    prepare = prepare or (lambda model: None)
    if hasattr(prompt_embeds, "embeds"):  # a PromptEmbeds: its family and [klein] negative come along
        family, negative_embeds = prompt_embeds.family, (negative_embeds if negative_embeds is not None
                                                         else prompt_embeds.negative)
        prompt_embeds = prompt_embeds.embeds
    else:
        family = None
    if prompt_embeds is None:
        job.check_models(transformer, text_encoder)
    else:
        job.check_models(transformer, embed_dim=prompt_embeds.shape[-1], family=family)
    params = job.request
    if job.start is not None:
        batch = edit_batch_size(job.start.shape[0], params.batch_size)
        outcome = edit_outcome(params.denoise, job.mask, (job.height // 16, job.width // 16), params.mask_mode)
        if outcome is not None:  # before any model runs
            log.info("%s", outcome)
            if notes is not None:
                notes.append(outcome)
            return job.start.expand(batch, -1, -1, -1).clone()

    if prompt_embeds is None:
        prepare(text_encoder)
        encoded = (encode or text_encoder.encode)(params.prompt)
        prompt_embeds = encoded.embeds
        if negative_embeds is None:
            negative_embeds = getattr(encoded, "negative", None)
    if negative_embeds is None and needs_negative(transformer, params.guidance) and text_encoder is not None:
        negative_embeds = text_encoder.negative_embeds().embeds
    if offload_text_encoder and text_encoder is not None:
        text_encoder.to("cpu")
    references = edit = None
    if job.images or job.start is not None:
        prepare(vae)
    if job.images:
        with torch.inference_mode():
            references = encode_references(vae, list(job.images), max_pixels=params.reference_max_pixels)
    if job.start is not None:
        edit = Edit(encode_start(vae, job.start), denoise=params.denoise, mask=job.mask, mask_mode=params.mask_mode,
                    source_as_reference=params.source_as_reference, crop_margin=params.crop_margin)
    prepare(transformer)
    latents = sample(transformer, prompt_embeds, references, width=job.width, height=job.height,
                     num_inference_steps=params.num_inference_steps, guidance=params.guidance, seed=params.seed,
                     batch_size=params.batch_size, negative_embeds=negative_embeds, edit=edit,
                     reference_cache=params.reference_cache, notes=notes, callback=callback,
                     should_cancel=should_cancel)
    prepare(vae)
    images = decode(vae, latents)
    if edit is not None and job.mask is not None and params.paste_back:
        images = paste_back(images, job.start, batch_of(job.mask, images.shape[0], "mask"), params.mask_mode)
    return images


def needs_negative(transformer, guidance: float) -> bool:
    """[klein] base with a guidance scale above 1 runs classifier-free guidance (diffusers' rule)."""
    return bool(getattr(transformer, "uses_cfg", False)) and guidance > 1.0


_guidance_notes: set[str] = set()


def _note_guidance_once(transformer, guidance: float) -> None:
    """Say once per model what the guidance input does there (it is ignored by [klein] distilled)."""
    if transformer.family != "klein" or transformer.source in _guidance_notes:
        return
    _guidance_notes.add(transformer.source)
    if transformer.distilled:
        log.info("%s is distilled: it runs without guidance, so the guidance input (%g) is ignored; %d steps suit "
                 "it.", transformer.name, guidance, DEFAULTS["klein-distilled"]["num_inference_steps"])
    elif guidance <= 1.0:
        log.info("%s: guidance %g is at most 1, so classifier-free guidance is off (one pass per step, as in "
                 "diffusers); %g is the usual scale.", transformer.name, guidance, DEFAULTS["klein-base"]["guidance"])


_SAME = object()  # negative_references default: the positive pass's references


def sample(transformer, prompt_embeds: torch.Tensor, references: References | None = None, *, width: int, height: int,
           num_inference_steps: int, guidance: float, seed: int, batch_size: int = 1,
           negative_embeds: torch.Tensor | None = None, edit: Edit | None = None, negative_references=_SAME,
           reference_cache: str = "auto", embedded_guidance="same", notes: list | None = None,
           callback: StepCallback | None = None, should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """The sampling stage: seeded noise (or an edit's start) -> denoised latents (B, 128, H/16, W/16), fp32 on the CPU.

    ``negative_embeds`` (the empty prompt's embeddings) are needed by [klein] base when guidance > 1;
    its pass sees the same references unless ``negative_references`` says otherwise (core conditioning
    carries its own). With an ``edit`` its latents set the size and the batch (width and height are
    ignored), ``edit.denoise`` how much of the schedule runs, and ``edit.mask`` what may change.
    ``reference_cache`` ("auto", "off", "approximate": reference_cache.py) says whether reference K/V are
    cached; ``embedded_guidance`` replaces ``guidance`` in [dev]'s guidance embedding (core conditioning carries
    its own; None leaves it out); ``notes`` (a list) receives what the user should know about the run.
    These latents are ComfyUI's FLUX.2 LATENT as they are: its VAE Decode with flux2-vae decodes them.
    """
    check_generation(num_inference_steps, guidance, seed, batch_size)
    check_text_encoder_fits(transformer, prompt_embeds.shape[-1])
    if negative_embeds is not None:
        check_text_encoder_fits(transformer, negative_embeds.shape[-1])
    _note_guidance_once(transformer, guidance)
    cfg = needs_negative(transformer, guidance)
    notes = notes if notes is not None else []
    if edit is None:
        noise = make_noise(seed, batch_size, width, height)
        sigmas = get_schedule(num_inference_steps, noise.shape[-2] * noise.shape[-1])
        run = _Run(transformer, prompt_embeds, references, negative_embeds if cfg else None,
                   references if negative_references is _SAME else negative_references, guidance,
                   reference_cache, notes, embedded_guidance)
        return run(noise, sigmas, callback=callback, should_cancel=should_cancel)
    return _sample_edit(transformer, prompt_embeds, references, edit, num_inference_steps=num_inference_steps,
                        guidance=guidance, seed=seed, batch_size=batch_size,
                        negative_embeds=negative_embeds if cfg else None, negative_references=negative_references,
                        reference_cache=reference_cache, notes=notes, embedded_guidance=embedded_guidance,
                        callback=callback, should_cancel=should_cancel)


class _Run:
    """The passes of one sampling run (positive, and negative for classifier-free guidance) around ``denoise``."""

    def __init__(self, transformer, embeds, references, negative_embeds, negative_references, guidance,
                 reference_cache="auto", notes=None, embedded_guidance="same"):
        self.transformer, self.guidance, self.embedded_guidance = transformer, guidance, embedded_guidance
        self.embeds, self.references = embeds, references
        self.negative_embeds, self.negative_references = negative_embeds, negative_references
        self.reference_cache, self.notes = reference_cache, notes if notes is not None else []

    def _pass(self, embeds, references, b):
        plan, note = plan_references(self.transformer, references is not None, self.reference_cache)
        if note and note not in self.notes:
            self.notes.append(note)
        return ModelPass(self.transformer, embeds, references, batch_size=b, plan=plan)

    def __call__(self, noise, sigmas, *, start=None, mask=None, callback=None, should_cancel=None):
        b = noise.shape[0]
        passes = [self._pass(self.embeds, self.references, b)]
        if self.negative_embeds is not None:
            passes.append(self._pass(self.negative_embeds, self.negative_references, b))
        kv = any(p.uses_kv for p in passes)
        with reference_kv_processors(self.transformer.model) if kv else contextlib.nullcontext():
            latents = denoise(self.transformer, noise, passes[0], sigmas=sigmas, guidance=self.guidance,
                              negative=passes[1] if len(passes) > 1 else None,
                              embedded_guidance=self.embedded_guidance, start=start, mask=mask,
                              callback=callback, should_cancel=should_cancel)
        for p in passes:
            if p.plan.cached and p.cache is not None:
                how = "reused from an earlier run" if p.reused else "computed at the first step"
                kept = " (kept for the next runs)" if p.key is not None else ""
                self.notes.append(f"reference cache: {p.references.num_tokens} reference tokens, "
                                  f"{p.cache_bytes / 2**20:.1f} MB, {how}{kept}")
        return latents.float().cpu()


def _sample_edit(transformer, embeds, references, edit: Edit, *, num_inference_steps, guidance, seed, batch_size,
                 negative_embeds, negative_references, reference_cache, notes, embedded_guidance, callback,
                 should_cancel) -> torch.Tensor:
    start = check_latent(edit.latents, what="The start LATENT")
    h, w = start.shape[-2:]
    check_start_size(16 * w, 16 * h, what="The start LATENT's image")
    check_denoise(num_inference_steps, edit.denoise)
    batch = edit_batch_size(start.shape[0], batch_size)
    outcome = edit_outcome(edit.denoise, edit.mask, (h, w), edit.mask_mode)
    if outcome is not None:
        log.info("%s", outcome)
        notes.append(outcome)
        return start.expand(batch, -1, -1, -1).clone()
    noise = make_noise(seed, batch, 16 * w, 16 * h)
    grid_mask = None
    if edit.mask is not None:
        grid_mask = latent_mask(batch_of(edit.mask, batch, "mask"), (h, w), edit.mask_mode)
    top, left, bottom, right = 0, 0, h, w
    if grid_mask is not None and edit.crop_margin > 0:
        top, left, bottom, right = mask_box(grid_mask, edit.crop_margin)
    crop = (..., slice(top, bottom), slice(left, right))
    clean, noise = start[crop], noise[crop]
    source = None
    if edit.source_as_reference and not edit.empty_start:
        source = latent_references([clean])
    negative_refs = references if negative_references is _SAME else negative_references
    run = _Run(transformer, embeds, join_references(source, references), negative_embeds,
               join_references(source, negative_refs), guidance, reference_cache, notes, embedded_guidance)
    sigmas = denoise_schedule(num_inference_steps, edit.denoise, (bottom - top) * (right - left))
    sampled = run(noise, sigmas, start=clean, mask=None if grid_mask is None else grid_mask[crop],
                  callback=callback, should_cancel=should_cancel)
    out = start.expand(batch, -1, -1, -1).clone()
    out[crop] = sampled
    return out


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The decode stage: latents (B, 128, h, w) -> ComfyUI IMAGE (B, 16h, 16w, 3) in [0, 1]."""
    with torch.inference_mode():
        pixels = vae.decode(latents.to(vae.device, vae.dtype))
    return latents_to_images(pixels)
