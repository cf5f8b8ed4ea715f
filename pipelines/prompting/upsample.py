"""Prompt upsampling: FLUX.2 [dev]'s own text encoder rewrites a short prompt, looking at the reference images.

The steps are diffusers' ``Flux2Pipeline.upsample_prompt`` (itself BFL's ``Mistral3SmallEmbedder.
upsample_prompt``): the text-to-image or image-to-image system message (imported from diffusers, the
same text as BFL's), ``format_input`` (diffusers' own function), the references side by side on white
and capped at 768 x 768 pixels in area, the chat padded to 2048 tokens on the tokenizer's side, then
``generate(do_sample=True, temperature=...)`` and ``batch_decode(skip_special_tokens=True)``.

What flux2kit adds: sampling is seeded (``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``,
so the same inputs give the same text and torch's global random state is left as it was: diffusers
draws from that global generator, so seeding it the same gives diffusers' text); ``max_new_tokens``
(diffusers fixes 512); temperature 0 decodes greedily; a generation that produces nothing usable gives
the original prompt back with a warning (as BFL's reference falls back); references that do not fit
in the 2048-token context are left out, last first, with a note; progress and Cancel per token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import PIL.Image
import torch

from ..errors import Flux2KitError
from ..generation.references import to_pil, to_rgb

logger = logging.getLogger("flux2kit")

MAX_PIXELS = 768**2  # diffusers' UPSAMPLING_MAX_IMAGE_SIZE, BFL's cap_pixels(..., 768**2)
MAX_LENGTH = 2048  # the chat's padded length in diffusers and BFL
DEFAULT_TEMPERATURE = 0.15  # diffusers' and BFL's default
DEFAULT_MAX_NEW_TOKENS = 512  # what diffusers and BFL generate
MAX_NEW_TOKENS = 2048
TEXT_TO_IMAGE, IMAGE_TO_IMAGE = "text-to-image", "image-to-image"


@dataclass
class Upsampled:
    """The upsampled prompt and how it came about."""

    text: str  # the prompt to use: the model's text, or the original when it produced nothing usable
    original: str
    mode: str  # TEXT_TO_IMAGE | IMAGE_TO_IMAGE
    generated: str  # the model's text as decoded (== text unless fell_back)
    new_tokens: int
    images_used: int = 0
    fell_back: bool = False
    reached_limit: bool = False  # generation ran to max_new_tokens instead of ending the text itself
    notes: list[str] = field(default_factory=list)


def system_message(mode: str) -> str:
    """BFL's upsampling instructions for ``mode``, as diffusers ships them."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE_UPSAMPLING_I2I, SYSTEM_MESSAGE_UPSAMPLING_T2I

    return SYSTEM_MESSAGE_UPSAMPLING_I2I if mode == IMAGE_TO_IMAGE else SYSTEM_MESSAGE_UPSAMPLING_T2I


def upsampling_image(images: list) -> PIL.Image.Image:
    """The one picture the model sees: the references side by side (centred, white background), at most 768² pixels.

    diffusers' ``_validate_and_process_images`` with all references of the prompt: ``concatenate_images`` (its
    public function), then the area cap with LANCZOS and ``int()`` sizes as ``_resize_if_exceeds_area``.
    """
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    pils = [to_rgb(to_pil(image)) for image in images]
    picture = Flux2ImageProcessor.concatenate_images(pils) if len(pils) > 1 else pils[0]
    w, h = picture.size
    if w * h > MAX_PIXELS:
        scale = math.sqrt(MAX_PIXELS / (w * h))
        picture = picture.resize((int(w * scale), int(h * scale)), PIL.Image.Resampling.LANCZOS)
    return picture


def check_upsampler(encoder) -> None:
    """A clear error unless ``encoder`` was loaded whole (FLUX.2 [dev]'s Mistral with its LM head)."""
    if getattr(encoder, "released", False):
        raise Flux2KitError("The text encoder was released to free memory; load it again to upsample prompts.")
    if getattr(encoder, "family", "mistral") == "qwen3":
        from ..models.full_text_encoder import KLEIN_REFUSAL

        raise Flux2KitError(f"This is FLUX.2 [klein]'s Qwen3 text encoder. {KLEIN_REFUSAL}")
    if not getattr(encoder, "can_upsample", False):
        raise Flux2KitError(
            "This text encoder was loaded with only the layers FLUX.2 reads (30 of Mistral's 40, no LM head), so it "
            "cannot write text. On FLUX.2 Load Text Encoder set parts to 'full model, for prompt upsampling' "
            "(load_full_text_encoder in Python, --upsample on the command line); it needs the Hugging Face folder."
        )


def upsample_prompt(encoder, prompt: str, images=(), *, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, callback=None, should_cancel=None) -> Upsampled:
    """Rewrite ``prompt`` with the whole FLUX.2 [dev] text encoder (``load_full_text_encoder``).

    ``images``: reference images (PIL or ComfyUI IMAGE items), all shown to the model side by side; none =
    text-to-image. ``callback(step, total)`` runs after each new token and may raise to cancel (as may
    ``should_cancel()``). The same encoder, inputs and ``seed`` give the same text on the same device.
    """
    check_upsampler(encoder)
    if not isinstance(prompt, str):
        raise Flux2KitError(f"The prompt to upsample must be text; got {type(prompt).__name__}.")
    images = list(images or [])
    if not prompt.strip() and not images:
        raise Flux2KitError("Nothing to upsample: the prompt is empty and no reference image is connected. Write a "
                            "short prompt (e.g. 'a fox in snow') or connect reference images.")
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise Flux2KitError(f"max_new_tokens must be 1-{MAX_NEW_TOKENS}, got {max_new_tokens}.")
    if not 0.0 <= float(temperature) <= 2.0 or math.isnan(float(temperature)):
        raise Flux2KitError(f"temperature must be 0-2 (0 = always the most likely word), got {temperature}.")
    if images and not encoder.has_vision:
        raise Flux2KitError(
            f"{len(images)} reference image(s) are connected, but this text encoder was loaded without the vision "
            "tower, so it cannot look at them. Disconnect the images for text-only upsampling, or load the Hugging "
            "Face folder of FLUX.2 [dev] with parts = 'full model, for prompt upsampling'."
        )
    notes: list[str] = []
    inputs, used = chat_inputs(encoder, prompt, images, notes)
    mode = IMAGE_TO_IMAGE if used else TEXT_TO_IMAGE
    generated_ids = _generate(encoder, inputs, temperature=float(temperature), seed=int(seed),
                              max_new_tokens=int(max_new_tokens), callback=callback, should_cancel=should_cancel)
    new = generated_ids[:, inputs["input_ids"].shape[1]:]
    text = encoder.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]
    count = int(new.shape[1])
    reached = count >= int(max_new_tokens) and int(new[0, -1]) != encoder.tokenizer.eos_token_id
    if reached:
        notes.append(f"stopped at max_new_tokens ({max_new_tokens}) before the model ended the text; raise it for the "
                     "whole prompt")
    result = Upsampled(text=text, original=prompt, mode=mode, generated=text, new_tokens=count, images_used=used,
                       reached_limit=reached, notes=notes)
    if not text.strip():
        result.text, result.fell_back = prompt, True
        note = "the model produced no text: the original prompt is used"
        notes.append(note)
        logger.warning("flux2kit prompt upsampling: %s.", note)
    return result


def chat_inputs(encoder, prompt: str, images: list, notes: list[str] | None = None) -> tuple[dict, int]:
    """``(model inputs, references used)`` for the prompt and as many references as fit in the 2048-token chat.

    References that do not fit are left out, last first, with a note appended to ``notes``; the inputs are
    what diffusers' processor call makes (ids and mask padded to 2048, Pixtral pixels and sizes).
    """
    notes = [] if notes is None else notes
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    tok = encoder.tokenizer
    for used in range(len(images), -1, -1):
        mode = IMAGE_TO_IMAGE if used else TEXT_TO_IMAGE
        picture = upsampling_image(images[:used]) if used else None
        messages = format_input(prompts=[prompt], system_message=system_message(mode),
                                images=[[picture]] if used else None)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)[0]
        pixel_values = None
        if used:
            pixel_values, size = encoder.pixtral.pixels(picture)
            text = encoder.pixtral.expand(text, [size])
        length = len(tok(text, add_special_tokens=False)["input_ids"])
        if length <= MAX_LENGTH or not used:
            break
    if used < len(images):
        notes.append(f"used reference images 1-{used} of {len(images)}: with this prompt the others do not fit in the "
                     f"model's {MAX_LENGTH}-token context" if used else
                     f"no reference image fits in the model's {MAX_LENGTH}-token context with this prompt: upsampled "
                     "as text-to-image; shorten the prompt to let the model see them")
        logger.warning("flux2kit prompt upsampling: %s.", notes[-1])
    if length > MAX_LENGTH:
        notes.append(f"the prompt is {length} tokens with the instructions; the model reads the first {MAX_LENGTH}")
    inputs = tok(text, add_special_tokens=False, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                 return_tensors="pt")
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if used:
        inputs["pixel_values"] = pixel_values
        inputs["image_sizes"] = torch.tensor([size])
    return inputs, used


class _TokenProgress:
    """A stopping criterion that never stops: reports each new token and lets the caller cancel."""

    def __init__(self, total: int, callback, should_cancel):
        self.total, self.callback, self.should_cancel, self.step = total, callback, should_cancel, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.step += 1
        if self.should_cancel is not None and self.should_cancel():
            from ..generation.sampling import Cancelled

            raise Cancelled("Prompt upsampling was cancelled.")
        if self.callback is not None:
            self.callback(self.step, self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(encoder, inputs: dict, *, temperature: float, seed: int, max_new_tokens: int, callback, should_cancel):
    from transformers import StoppingCriteriaList

    model = encoder.generator
    device = encoder.device
    inputs = {k: v.to(device) for k, v in inputs.items() if k != "image_sizes"} | (
        {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {})
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(device, encoder.dtype)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    progress = StoppingCriteriaList([_TokenProgress(max_new_tokens, callback, should_cancel)])
    cuda = [device.index or 0] if device.type == "cuda" else []
    # diffusers and transformers sample from torch's global generator: seed it here and give the caller
    # its random state back afterwards.
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True, stopping_criteria=progress,
                              **sampling)
