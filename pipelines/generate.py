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
from .parameters import DEFAULTS, RECOMMENDED_REFERENCES, check_generation, make_noise, resolve_size
from .references import References, encode_references, split_images, to_pil
from .sampling import StepCallback, denoise

log = logging.getLogger("flux2kit")


# Embedding width -> the encoder that makes it and the model it belongs to (FLUX2_FACTS.md).
_ENCODER_WIDTHS = {
    15360: ("Mistral-Small-3", "FLUX.2 [dev]"),
    7680: ("Qwen3-4B", "FLUX.2 [klein] 4B"),
    12288: ("Qwen3-8B", "FLUX.2 [klein] 9B"),
}
_ENCODER_FOR = {  # transformer variant -> the text encoder to load
    "dev": "the Mistral-Small-3 text encoder (mistral_3_small_flux2_*.safetensors or the FLUX.2-dev text_encoder folder)",
    "klein-4b": "the Qwen3-4B text encoder (qwen_3_4b*.safetensors or the FLUX.2-klein-4B text_encoder folder)",
    "klein-9b": "the Qwen3-8B text encoder (qwen_3_8b*.safetensors or the FLUX.2-klein-9B text_encoder folder)",
}
_FAMILY_ENCODER = {"mistral": ("a Mistral-Small-3 text encoder", "dev"), "qwen3": ("a Qwen3 text encoder", "klein")}


def _needed_encoder(transformer) -> str:
    if transformer.variant in _ENCODER_FOR:
        return _ENCODER_FOR[transformer.variant]
    if transformer.family == "klein":
        return f"a Qwen3 text encoder making {transformer.text_width}-wide embeddings (3 x its hidden size)"
    return f"a Mistral-Small-3 text encoder making {transformer.text_width}-wide embeddings (3 x its hidden size)"


def check_text_encoder_fits(transformer, embed_dim: int, family: str | None = None) -> None:
    """The text encoder must be the transformer's: the right family ([dev] Mistral, [klein] Qwen3) and width.

    ``family`` is the encoder's ("mistral" / "qwen3") when known; embeddings alone are judged by width.
    """
    name = getattr(transformer, "name", "the transformer")
    fix = f"Load {_needed_encoder(transformer)}."
    if family in _FAMILY_ENCODER and _FAMILY_ENCODER[family][1] != transformer.family:
        which, model = _FAMILY_ENCODER[family]
        raise Flux2KitError(
            f"The text encoder is {which}, the one FLUX.2 [{model}] uses, but the transformer is {name}: they "
            f"belong to different models. {fix}"
        )
    if embed_dim != transformer.text_width:
        known = _ENCODER_WIDTHS.get(int(embed_dim))
        made_by = f" ({known[0]}, the encoder of {known[1]})" if known else ""
        raise Flux2KitError(
            f"The text encoder makes {embed_dim}-wide embeddings{made_by} but the transformer expects "
            f"{transformer.text_width} ({name}): they belong to different models. {fix}"
        )


def check_conditioning_fits(transformer, conditioning) -> None:
    """Prompt embeddings (``PromptEmbeds``) against the transformer: family, width, and [klein] base's negative."""
    check_text_encoder_fits(transformer, conditioning.embeds.shape[-1], getattr(conditioning, "family", None))


def check_prompt_or_images(prompt: str, images: list) -> None:
    """PARAMETERS.md: an empty prompt is allowed only with reference images."""
    if not prompt.strip() and not images:
        raise Flux2KitError("The prompt is empty and no reference image is connected: write a prompt or connect an image.")


def warn_reference_count(count: int, variant: str = "dev") -> str | None:
    """A warning when more references are given than the variant ("dev", "klein", "klein-4b", ...) is tuned for."""
    family = variant.split("-")[0]
    limit = RECOMMENDED_REFERENCES.get(family, 6)
    if count > limit:
        msg = (f"{count} reference images: FLUX.2 [{family}] is tuned for at most {limit}; results may degrade "
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
    negative_embeds: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Make ``batch_size`` images; returns a ComfyUI IMAGE tensor (B, H, W, 3) in [0, 1].

    ``prompt_embeds`` (already encoded ``prompt``) lets a caller free the text encoder before the
    transformer loads; ``text_encoder`` may then be None ([klein] base then needs ``negative_embeds``,
    the empty prompt's embeddings, too).
    """
    images = split_images(images)
    check_prompt_or_images(prompt, images)
    first_size = to_pil(images[0]).size if images else None
    width, height = resolve_size(aspect_ratio, resolution, width, height, first_size)
    check_generation(num_inference_steps, guidance, seed, batch_size)
    if prompt_embeds is None and text_encoder is None:
        raise Flux2KitError("No text encoder and no prompt embeddings: connect a FLUX.2 text encoder.")
    if prompt_embeds is None:
        check_text_encoder_fits(transformer, text_encoder.embed_dim, getattr(text_encoder, "family", None))
    else:
        check_text_encoder_fits(transformer, prompt_embeds.shape[-1])
    warn_reference_count(len(images), transformer.family)

    embeds = text_encoder.encode(prompt).embeds if prompt_embeds is None else prompt_embeds
    if negative_embeds is None and needs_negative(transformer, guidance) and text_encoder is not None:
        negative_embeds = text_encoder.negative_embeds().embeds
    if offload_text_encoder and text_encoder is not None:
        text_encoder.to("cpu")
    references: References | None = encode_references(vae, images, max_pixels=reference_max_pixels)
    latents = sample(transformer, embeds, references, width=width, height=height,
                     num_inference_steps=num_inference_steps, guidance=guidance, seed=seed, batch_size=batch_size,
                     negative_embeds=negative_embeds, callback=callback, should_cancel=should_cancel)
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
