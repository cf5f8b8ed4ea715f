"""Editing: FLUX.2 VAE Encode (IMAGE -> ComfyUI's FLUX.2 LATENT) and the edit inputs the Sampler and Generate share."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..pipelines.generation.editing import (
    MASK_MODES,
    check_start_size,
    crop_to_multiple,
    encode_start,
    fit_mask,
    latent_dict,
)
from ..pipelines.generation.reference_cache import REFERENCE_CACHE_MODES
from ..pipelines.parameters import MAX_SIDE
from . import services
from .types import CATEGORY, VAE

CROP_NOTE = ("Sides that are not multiples of 16 are centre-cropped to the nearest smaller multiple of 16, as "
             "ComfyUI's VAE Encode does for FLUX.2 (its VAE halves the size three times and packs 2x2 patches: 16).")


def edit_inputs() -> list:
    """The edit options the Sampler and Generate share (optional, at the end: saved workflows keep their values)."""
    return [
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="How much of the start image is repainted, as in ComfyUI's KSampler: the steps run on "
                               "the schedule of steps / denoise steps, from where it has that many steps left. 1 = "
                               "from noise; 0 = the start image unchanged. Needs a start image below 1."),
        io.Boolean.Input("source_as_reference", default=True, optional=True,
                         tooltip="Also give the start image to the model as a reference (diffusers' FLUX.2 inpaint "
                                 "pipeline always does). It is then image 1 in the prompt, and the wired references "
                                 "count from image 2. Off: the start image is only where sampling starts."),
        io.Boolean.Input("paste_back", default=True, optional=True,
                         tooltip="Inpainting: outside the mask the result is the start image's own pixels, bit-exact "
                                 "(the VAE alone would shift them slightly). Off: the decoded image as is (diffusers' "
                                 "output). The Sampler's LATENT carries the paste for FLUX.2 Decode; core VAE Decode "
                                 "shows the raw result."),
        io.Combo.Input("mask_mode", options=list(MASK_MODES), default="binary", optional=True,
                       tooltip="binary: the mask is cut at 0.5, then resized to the 16-pixel latent grid (diffusers' "
                               "FLUX.2 inpaint pipeline). soft: grey values blend gradually (feathered masks from "
                               "Feather Mask or Image Pad for Outpainting), as ComfyUI's noise_mask does."),
        io.Int.Input("crop_margin", default=0, min=0, max=MAX_SIDE, step=16, optional=True,
                     tooltip="Crop and stitch: above 0, only the mask's bounding box plus this many pixels of context "
                             "is sampled, at full resolution (faster on large images), then stitched back. 0 = the "
                             "whole image."),
    ]


class VAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitVAEEncode",
            display_name="FLUX.2 VAE Encode (flux2kit)",
            category=CATEGORY,
            description="Encodes images into ComfyUI's FLUX.2 LATENT (128 channels at 1/16), the start of an "
                        "image-to-image or inpaint run in FLUX.2 Sampler. " + CROP_NOTE + " The LATENT keeps the "
                        "pixels, so FLUX.2 Decode can paste the untouched area back exactly.",
            inputs=[
                VAE.Input("vae", tooltip="From FLUX.2 Load VAE."),
                io.Image.Input("image", tooltip="The start image (or a batch). At most 4 MP and 64-4096 pixels a side: "
                                                "it is never resized silently. " + CROP_NOTE),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional inpaint mask (white = repaint), any size with the image's aspect ratio: "
                                      "cropped like the image and stored as the LATENT's noise_mask."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The FLUX.2 latent, with the pixels (and the mask as "
                                                                "noise_mask) for inpainting."),
                io.Image.Output(display_name="IMAGE", tooltip="The image as encoded (after the crop)."),
                io.Mask.Output(display_name="MASK", tooltip="The mask cropped like the image (all zero without a mask)."),
            ],
        )

    @classmethod
    def execute(cls, vae, image, mask=None) -> io.NodeOutput:
        pixels = crop_to_multiple(image[..., :3].float().cpu())
        height, width = pixels.shape[1:3]
        check_start_size(width, height, what=f"The image ({image.shape[2]}x{image.shape[1]}, cropped to "
                                             f"{width}x{height})")
        crop_mask = None
        if mask is not None:
            crop_mask = fit_mask(mask, width, height, original=(image.shape[2], image.shape[1]))
        services.load_to_device(vae)
        latents = encode_start(vae, pixels)
        out_mask = crop_mask if crop_mask is not None else torch.zeros(pixels.shape[0], height, width)
        return io.NodeOutput(latent_dict(latents, pixels=pixels, noise_mask=crop_mask), pixels, out_mask)


REFERENCE_CACHE_TIP = (
    "Reuse the references' attention keys and values instead of recomputing them every step. auto: FLUX.2 [klein] "
    "9B KV (loader klein_mode 'kv') computes them once and keeps them across runs that change only the prompt, seed, "
    "size or denoise (exact: the same picture as without the cache); other models run normally. off: no cache. "
    "approximate: other models too, as ComfyUI's experimental Flux KV Cache node does (references at timestep 0, "
    "K/V from the first step): faster, but the picture changes slightly (README, Cached references). Memory on the "
    "GPU: K and V of every reference token in every block, 2 x width x blocks x 2 bytes in bf16: [klein] 9B 0.5 MB "
    "per token (2 GB per 1 MP reference), [klein] 4B 0.29 MB (1.2 GB), [dev] 1.3 MB (5.3 GB); the node shows the "
    "actual size after the run.")


def reference_cache_input() -> io.Combo.Input:
    return io.Combo.Input("reference_cache", options=list(REFERENCE_CACHE_MODES), default="auto", optional=True,
                          tooltip=REFERENCE_CACHE_TIP)


NODES = [VAEEncode]
