"""What one generation asks for, checked in one place and one order (docs/parameters.md).

The command line, the Generate node and ``generate()`` build the same :class:`GenerationRequest`
and call :meth:`GenerationRequest.check` before anything heavy runs; the result, a
:class:`CheckedRequest`, carries the flattened references and the resolved size. Whether the
loaded models fit the request (the text encoder belongs to the transformer) is
:meth:`CheckedRequest.check_models`.

Order of the checks: the prompt (empty only with references or a start image), "image N" in the
prompt against the references (the start image counts as image 1 when it is used as a reference),
each reference (size, aspect), the start image (size, at most 4 MP), the mask (needs a start image,
the start image's aspect), denoise, the edit options and reference cache, the output size (a start image's wins), the
ranges (steps, guidance, seed, batch), then the models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from ..errors import Flux2KitError
import torch

from ..parameters import DEFAULTS, MAX_SIDE, RECOMMENDED_REFERENCES, check_denoise, check_generation, resolve_size
from ..prompting.json_prompt import check_reference_mentions
from .editing import MASK_MODES, check_start_size, crop_to_multiple, edit_batch_size, fit_mask, image_tensor
from .reference_cache import REFERENCE_CACHE_MODES
from .references import check_reference, split_images, to_pil

log = logging.getLogger("flux2kit")

# Embedding width -> the encoder that makes it and the model it belongs to (docs/checkpoints.md).
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


@dataclass(frozen=True)
class GenerationRequest:
    """The shared generation inputs; ``images`` are the references in order (PIL, IMAGE items or batches)."""

    prompt: str = ""
    images: tuple = ()
    aspect_ratio: str = "1:1"
    resolution: str = "1 MP"
    width: int | None = None  # both set (non-zero): an exact size instead of aspect_ratio and resolution
    height: int | None = None
    num_inference_steps: int = DEFAULTS["dev"]["num_inference_steps"]
    guidance: float = DEFAULTS["dev"]["guidance"]
    seed: int = 0
    batch_size: int = 1
    reference_max_pixels: int | None = None  # None: 1 MP each (a single reference may be allowed up to 4 MP)
    # Editing (local only: the hosted models edit through references).
    start_image: object = None  # image-to-image / inpaint: an IMAGE (batch), PIL image or array to start from
    mask: object = None  # inpaint: a MASK, PIL "L" image or array, 1 (white) = repaint; the start image's aspect
    denoise: float = 1.0  # ComfyUI KSampler's: the steps run on the schedule of int(steps / denoise) steps
    source_as_reference: bool = True  # the start image is also reference image 1 (diffusers' inpaint pipeline)
    paste_back: bool = True  # outside the mask, the result is the start image's own pixels
    mask_mode: str = "binary"  # "binary" (diffusers) or "soft" (feathered masks blend)
    crop_margin: int = 0  # > 0: sample only the mask's box plus this many pixels, then stitch
    reference_cache: str = "auto"  # "auto", "off", "approximate" (generation/reference_cache.py)

    def check(self) -> CheckedRequest:
        """Every check of the inputs alone, in one order; the request with its size resolved."""
        images = split_images(self.images)
        start = image_tensor(self.start_image) if self.start_image is not None else None
        check_prompt_or_images(self.prompt, images, start is not None)
        source = int(start is not None and self.source_as_reference)
        check_reference_mentions(self.prompt, len(images) + source)  # 'image 5' with 2 references: a clear error
        pils = [to_pil(image) for image in images]
        for number, pil in enumerate(pils, start=1):
            check_reference(pil, number)
        mask = self._check_edit(start)
        if start is not None:
            start = crop_to_multiple(start)
            height, width = start.shape[1:3]
            edit_batch_size(start.shape[0], self.batch_size)
        else:
            width, height = resolve_size(self.aspect_ratio, self.resolution, self.width or None,
                                         self.height or None, pils[0].size if pils else None)
        check_generation(self.num_inference_steps, self.guidance, self.seed, self.batch_size)
        if mask is not None:  # at the start image's size as given: the same crop
            mask = crop_to_multiple(mask.unsqueeze(-1)).squeeze(-1)
        return CheckedRequest(replace(self, images=tuple(images)), width, height, start=start, mask=mask)

    def _check_edit(self, start: torch.Tensor | None):
        """The start image's size, the mask's presence and aspect, denoise and the edit options."""
        mask = None
        if start is not None:
            h, w = start.shape[1:3]
            check_start_size((w // 16) * 16, (h // 16) * 16)
        if self.mask is not None:
            if start is None:
                raise Flux2KitError("A mask needs a start image to repaint: give the image the mask belongs to "
                                    "(--start-image on the command line, the start_image input in ComfyUI).")
            h, w = start.shape[1:3]
            mask = fit_mask(self.mask, w, h)  # its aspect against the image as given (before the crop)
        check_denoise(self.num_inference_steps, self.denoise)
        if self.denoise < 1 and start is None:
            raise Flux2KitError(f"denoise {self.denoise:g} needs a start image: below 1 it keeps part of the "
                                "start image. Give one, or set denoise to 1.")
        if self.mask_mode not in MASK_MODES:
            raise Flux2KitError(f"Unknown mask_mode {self.mask_mode!r}; use one of {', '.join(MASK_MODES)}.")
        if not 0 <= self.crop_margin <= MAX_SIDE:
            raise Flux2KitError(f"crop_margin must be 0-{MAX_SIDE} pixels, got {self.crop_margin}.")
        if self.reference_cache not in REFERENCE_CACHE_MODES:
            raise Flux2KitError(f"Unknown reference_cache {self.reference_cache!r}; use one of "
                                f"{', '.join(REFERENCE_CACHE_MODES)}.")
        return mask


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose inputs passed :meth:`GenerationRequest.check`: flat references, resolved size."""

    request: GenerationRequest
    width: int
    height: int
    start: torch.Tensor | None = None  # the start image centre-cropped to multiples of 16: IMAGE (B, H, W, 3)
    mask: torch.Tensor | None = None  # the mask at the start image's size (B, H, W), 1 = repaint
    warnings: list = field(default_factory=list)

    @property
    def images(self) -> tuple:
        return self.request.images

    def check_models(self, transformer, text_encoder=None, *, embed_dim: int | None = None,
                     family: str | None = None) -> None:
        """The text encoder (or embeddings ``embed_dim`` wide) must belong to the transformer; warn once when
        more references are given than the model is tuned for."""
        if text_encoder is not None:
            embed_dim, family = text_encoder.embed_dim, getattr(text_encoder, "family", None)
        if embed_dim is None:
            raise Flux2KitError("No text encoder and no prompt embeddings: connect a FLUX.2 text encoder.")
        check_text_encoder_fits(transformer, embed_dim, family)
        if not self.warnings:
            warning = warn_reference_count(len(self.images), transformer.family)
            if warning:
                self.warnings.append(warning)


def check_prompt_or_images(prompt: str, images: list, start: bool = False) -> None:
    """An empty prompt is allowed only with reference images or a start image."""
    if not prompt.strip() and not images and not start:
        raise Flux2KitError("The prompt is empty and no reference image is given: write a prompt or give a reference "
                            "image (on the command line: --prompt TEXT or --image PATH).")


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
    """Prompt embeddings (``PromptEmbeds``) against the transformer: family and width."""
    check_text_encoder_fits(transformer, conditioning.embeds.shape[-1], getattr(conditioning, "family", None))
