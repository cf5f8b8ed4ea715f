"""Text (and references) to image, the stages in the order they run:
check the request -> encode prompt -> encode references -> noise -> denoise -> decode.

Each stage is usable on its own (the Sampler and Decode nodes call them one by one); ``generate``
is the one path through all of them, used by the Generate node, the command line and the parity tests.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..parameters import DEFAULTS, check_generation, make_noise
from .references import References, encode_references
from .request import CheckedRequest, GenerationRequest, check_text_encoder_fits
from .sampling import StepCallback, denoise

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
    **params,
) -> torch.Tensor:
    """Make the request's images; returns a ComfyUI IMAGE tensor (B, H, W, 3) in [0, 1].

    ``request`` (or the same fields as keyword arguments: prompt, images, aspect_ratio, ...) is checked
    first unless it already was. ``prompt_embeds`` (the prompt already encoded: a tensor or a
    ``PromptEmbeds``) lets a caller free the text encoder before the transformer loads;
    ``text_encoder`` may then be None ([klein] base then needs ``negative_embeds``, the empty prompt's
    embeddings, too). ``encode(prompt)`` replaces ``text_encoder.encode`` (e.g. a cached encoder);
    ``prepare(model)`` runs before each model is used (e.g. to move it onto the GPU).
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
    references = None
    if job.images:
        prepare(vae)
        with torch.inference_mode():
            references = encode_references(vae, list(job.images), max_pixels=params.reference_max_pixels)
    prepare(transformer)
    latents = sample(transformer, prompt_embeds, references, width=job.width, height=job.height,
                     num_inference_steps=params.num_inference_steps, guidance=params.guidance, seed=params.seed,
                     batch_size=params.batch_size, negative_embeds=negative_embeds, callback=callback,
                     should_cancel=should_cancel)
    prepare(vae)
    return decode(vae, latents)


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


def sample(transformer, prompt_embeds: torch.Tensor, references: References | None = None, *, width: int, height: int,
           num_inference_steps: int, guidance: float, seed: int, batch_size: int = 1,
           negative_embeds: torch.Tensor | None = None,
           callback: StepCallback | None = None, should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """The sampling stage: seeded noise -> denoised latents (B, 128, H/16, W/16), fp32 on the CPU.

    ``negative_embeds`` (the empty prompt's embeddings) are needed by [klein] base when guidance > 1.
    These latents are ComfyUI's FLUX.2 LATENT as they are: its VAE Decode with flux2-vae decodes them.
    """
    check_generation(num_inference_steps, guidance, seed, batch_size)
    check_text_encoder_fits(transformer, prompt_embeds.shape[-1])
    if negative_embeds is not None:
        check_text_encoder_fits(transformer, negative_embeds.shape[-1])
    _note_guidance_once(transformer, guidance)
    noise = make_noise(seed, batch_size, width, height)
    latents = denoise(transformer, noise, prompt_embeds, num_steps=num_inference_steps, guidance=guidance,
                      references=references, negative_embeds=negative_embeds if needs_negative(transformer, guidance)
                      else None, callback=callback, should_cancel=should_cancel)
    return latents.float().cpu()


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The decode stage: latents (B, 128, h, w) -> ComfyUI IMAGE (B, 16h, 16w, 3) in [0, 1]."""
    with torch.inference_mode():
        pixels = vae.decode(latents.to(vae.device, vae.dtype))
    return latents_to_images(pixels)
