"""Text (and references) to image, the stages in the order they run:
check inputs -> encode prompt -> encode references -> noise -> denoise -> decode.

Each stage is usable on its own (the ComfyUI nodes call them one by one); ``generate`` is the
one-call version used by the Generate node, the demo and the parity tests.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .errors import Flux2KitError
from .parameters import RECOMMENDED_REFERENCES, check_generation, make_noise, resolve_size
from .references import References, encode_references, split_images, to_pil
from .sampling import StepCallback, denoise

log = logging.getLogger("flux2kit")


def check_text_encoder_fits(transformer, embed_dim: int) -> None:
    """The text encoder's embedding width must be the transformer's text input width."""
    if embed_dim != transformer.text_width:
        raise Flux2KitError(
            f"The text encoder makes {embed_dim}-wide embeddings but the transformer expects "
            f"{transformer.text_width}: they belong to different models. FLUX.2 [dev] needs the Mistral-Small-3 "
            "text encoder (mistral_3_small_flux2_*.safetensors or the FLUX.2-dev text_encoder folder)."
        )


def check_prompt_or_images(prompt: str, images: list) -> None:
    """PARAMETERS.md: an empty prompt is allowed only with reference images."""
    if not prompt.strip() and not images:
        raise Flux2KitError("The prompt is empty and no reference image is connected: write a prompt or connect an image.")


def warn_reference_count(count: int, variant: str = "dev") -> str | None:
    """A warning when more references are given than the variant is tuned for."""
    limit = RECOMMENDED_REFERENCES.get(variant.split("-")[0], 6)
    if count > limit:
        msg = (f"{count} reference images: FLUX.2 [{variant}] is tuned for at most {limit}; results may degrade "
               "and every 1 MP reference adds about 4096 tokens to attention.")
        log.warning(msg)
        return msg
    return None


def latents_to_images(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) in [0, 1], fp32 on the CPU."""
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu()


def generate(
    transformer,
    text_encoder,
    vae,
    *,
    prompt: str = "",
    images=None,
    aspect_ratio: str = "1:1",
    resolution: str = "1 MP",
    width: int | None = None,
    height: int | None = None,
    num_inference_steps: int = 28,
    guidance: float = 4.0,
    seed: int = 0,
    batch_size: int = 1,
    reference_max_pixels: int | None = None,
    offload_text_encoder: bool = False,
    prompt_embeds: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Make ``batch_size`` images; returns a ComfyUI IMAGE tensor (B, H, W, 3) in [0, 1].

    ``prompt_embeds`` (already encoded ``prompt``) lets a caller free the text encoder before the
    transformer loads; ``text_encoder`` may then be None.
    """
    images = split_images(images)
    check_prompt_or_images(prompt, images)
    first_size = to_pil(images[0]).size if images else None
    width, height = resolve_size(aspect_ratio, resolution, width, height, first_size)
    check_generation(num_inference_steps, guidance, seed, batch_size)
    if prompt_embeds is None and text_encoder is None:
        raise Flux2KitError("No text encoder and no prompt embeddings: connect a FLUX.2 text encoder.")
    check_text_encoder_fits(transformer, text_encoder.embed_dim if prompt_embeds is None else prompt_embeds.shape[-1])
    warn_reference_count(len(images), transformer.variant)

    embeds = text_encoder.encode(prompt).embeds if prompt_embeds is None else prompt_embeds
    if offload_text_encoder and text_encoder is not None:
        text_encoder.to("cpu")
    references: References | None = encode_references(vae, images, max_pixels=reference_max_pixels)
    latents = sample(transformer, embeds, references, width=width, height=height,
                     num_inference_steps=num_inference_steps, guidance=guidance, seed=seed, batch_size=batch_size,
                     callback=callback, should_cancel=should_cancel)
    return decode(vae, latents)


def sample(transformer, prompt_embeds: torch.Tensor, references: References | None = None, *, width: int, height: int,
           num_inference_steps: int, guidance: float, seed: int, batch_size: int = 1,
           callback: StepCallback | None = None, should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """The sampling stage: seeded noise -> denoised latents (B, 128, H/16, W/16), fp32 on the CPU.

    These latents are ComfyUI's FLUX.2 LATENT as they are: its VAE Decode with flux2-vae decodes them.
    """
    check_generation(num_inference_steps, guidance, seed, batch_size)
    check_text_encoder_fits(transformer, prompt_embeds.shape[-1])
    noise = make_noise(seed, batch_size, width, height)
    latents = denoise(transformer, noise, prompt_embeds, num_steps=num_inference_steps, guidance=guidance,
                      references=references, callback=callback, should_cancel=should_cancel)
    return latents.float().cpu()


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The decode stage: latents (B, 128, h, w) -> ComfyUI IMAGE (B, 16h, 16w, 3) in [0, 1]."""
    with torch.inference_mode():
        pixels = vae.decode(latents.to(vae.device, vae.dtype))
    return latents_to_images(pixels)
