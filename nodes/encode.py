"""Encoding nodes: the prompt, and 1-10 reference images."""

from __future__ import annotations

from collections import OrderedDict

import torch
from comfy_api.latest import io

from ..pipelines.errors import Flux2KitError
from ..pipelines.generation.conditioning import to_core_conditioning
from ..pipelines.generation.references import encode_references, split_images
from ..pipelines.generation.request import warn_reference_count
from ..pipelines.parameters import MAX_REFERENCES, MEGAPIXEL, RECOMMENDED_REFERENCES
from . import services
from .types import CATEGORY, VAE, Conditioning, References, TextEncoder

REFERENCE_SIZES = {"1 MP each (standard)": MEGAPIXEL, "up to 4 MP for a single reference": 4 * MEGAPIXEL}
_PROMPT_CACHE_SIZE = 8


def images_input(tooltip: str) -> io.Autogrow.Input:
    """Reference images image_1..image_10 as a growing list; each may be an IMAGE batch."""
    names = [f"image_{i}" for i in range(1, MAX_REFERENCES + 1)]
    return io.Autogrow.Input("images", template=io.Autogrow.TemplateNames(
        io.Image.Input("image", tooltip=tooltip), names=names, min=0), optional=True, tooltip=tooltip)


def ordered_images(images: dict | None) -> list:
    """The wired images in reference order (image_1 first); batches are split into single images."""
    if not images:
        return []
    ordered = [images[k] for k in sorted(images, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    flat = split_images(ordered)
    if len(flat) > MAX_REFERENCES:
        raise Flux2KitError(f"{len(flat)} reference images are wired (batches count one per image); FLUX.2 takes at "
                            f"most {MAX_REFERENCES}. Remove some.")
    return flat


def encode_prompt(text_encoder, prompt: str):
    """Encode with a small per-encoder cache, so re-runs with the same prompt skip the text encoder."""
    if getattr(text_encoder, "released", False):
        raise Flux2KitError("The text encoder was released; run its loader again.")
    cache = text_encoder.__dict__.setdefault("_flux2kit_prompt_cache", OrderedDict())
    if prompt in cache:
        cache.move_to_end(prompt)
        return cache[prompt]
    services.load_to_device(text_encoder)
    encoded = text_encoder.encode(prompt)
    encoded.embeds = encoded.embeds.cpu()
    if getattr(text_encoder, "uses_negative_prompt", False):
        # [klein] base guides against the empty prompt: carry it, so the sampler needs no text encoder.
        encoded.negative = text_encoder.negative_embeds().embeds.cpu()
    cache[prompt] = encoded
    while len(cache) > _PROMPT_CACHE_SIZE:
        cache.popitem(last=False)
    return encoded


def prompt_status(encoded, max_length: int) -> str:
    n = encoded.token_counts[0]
    text = f"{n} of {max_length} tokens"
    if encoded.truncated[0]:
        text += f" - TRUNCATED: the last {n - max_length} tokens are ignored; shorten the prompt"
    return text


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitTextEncode",
            display_name="FLUX.2 Text Encode (flux2kit)",
            category=CATEGORY,
            description="Turns a prompt (plain text or a JSON prompt) into FLUX.2 conditioning. Shows the token count; "
                        "FLUX.2 reads at most 512 tokens.",
            inputs=[
                TextEncoder.Input("text_encoder", tooltip="From FLUX.2 Load Text Encoder."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to make. Earlier words weigh more. Name references by number: "
                                        "'the person from image 1 in the room from image 2'. Empty is allowed with references."),
            ],
            outputs=[Conditioning.Output(display_name="conditioning", tooltip="The encoded prompt.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, text_encoder, prompt) -> io.NodeOutput:
        encoded = encode_prompt(text_encoder, prompt)
        services.show_text(cls.hidden.unique_id if cls.hidden else None, prompt_status(encoded, text_encoder.max_length))
        return io.NodeOutput(encoded)


class ReferenceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitReferenceEncode",
            display_name="FLUX.2 Multi-Reference Encode (flux2kit)",
            category=CATEGORY,
            description="Encodes 1-10 reference images with the VAE into reference tokens, numbered image 1..N in the "
                        "order wired. Each 1 MP reference adds about 4096 tokens; [dev] is tuned for up to 6.",
            inputs=[
                VAE.Input("vae", tooltip="From FLUX.2 Load VAE."),
                images_input("Reference images, numbered in the order wired. IMAGE batches count one per image; "
                             "grayscale and transparent images are converted (transparency onto white)."),
                io.Combo.Input("reference_size", options=list(REFERENCE_SIZES), default="1 MP each (standard)",
                               tooltip="References are downscaled to 1 MP each (as diffusers does); a single "
                                       "reference may keep up to 4 MP (BFL's reference code)."),
            ],
            outputs=[References.Output(display_name="references", tooltip="Reference tokens for the sampler.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, vae, images=None, reference_size="1 MP each (standard)") -> io.NodeOutput:
        flat = ordered_images(images)
        if not flat:
            raise Flux2KitError("Connect at least one reference image to FLUX.2 Multi-Reference Encode.")
        services.load_to_device(vae)
        with torch.inference_mode():
            refs = encode_references(vae, flat, max_pixels=REFERENCE_SIZES.get(reference_size, MEGAPIXEL))
        refs.tokens = refs.tokens.cpu()
        status = f"{refs.count} reference{'s' if refs.count > 1 else ''}: {refs.num_tokens} tokens"
        warning = warn_reference_count(refs.count, "dev")
        if warning:
            status += f" - more than {RECOMMENDED_REFERENCES['dev']} ([dev]) or {RECOMMENDED_REFERENCES['klein']} ([klein]) may degrade results"
        services.show_text(cls.hidden.unique_id if cls.hidden else None, status)
        return io.NodeOutput(refs)


class ToCoreConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitToCoreConditioning",
            display_name="FLUX.2 Conditioning to Core (flux2kit)",
            category=CATEGORY,
            description="FLUX.2 Text Encode's conditioning as ComfyUI's CONDITIONING, for core conditioning nodes "
                        "(Reference Latent, FluxGuidance, ...) feeding FLUX.2 Sampler. Core's FLUX.2 model pads it "
                        "the same way, so the picture does not change.",
            inputs=[Conditioning.Input("conditioning", tooltip="From FLUX.2 Text Encode.")],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="The prompt's embeddings as CONDITIONING."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="[klein]: the empty prompt's embeddings (FLUX.2 [klein] base guides "
                                               "against them); [dev]: zeros, like core Conditioning Zero Out."),
            ],
        )

    @classmethod
    def execute(cls, conditioning) -> io.NodeOutput:
        negative = getattr(conditioning, "negative", None)
        if negative is None:
            negative = torch.zeros_like(conditioning.embeds)
        return io.NodeOutput(to_core_conditioning(conditioning.embeds), to_core_conditioning(negative))


NODES = [TextEncode, ReferenceEncode, ToCoreConditioning]
