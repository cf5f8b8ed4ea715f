"""Reference images: preprocessing (docs/parameters.md, "References") and encoding into reference tokens.

Reference i (1-based) is encoded by the VAE and appended after the target tokens with position ids
(T=10*i, h, w, 0), so the model tells the references apart by their T coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ..errors import Flux2KitError
from ..parameters import MAX_REFERENCES, MEGAPIXEL

MIN_SIDE = 64
MAX_ASPECT = 8.0
SINGLE_REFERENCE_MAX_PIXELS = 4 * MEGAPIXEL  # BFL's reference code allows ~4 MP for a lone reference


@dataclass
class References:
    """Encoded references: tokens (1 or B, N, 128) and their position ids (1, N, 4)."""

    tokens: torch.Tensor
    ids: torch.Tensor
    sizes: list[tuple[int, int]]  # (width, height) of each preprocessed reference, in pixels
    first_size: tuple[int, int] | None = None  # (width, height) of image 1 as given: match_input_image

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])


def to_pil(image) -> PIL.Image.Image:
    """A PIL image from PIL, a (H, W, C) array/tensor in [0, 1] (ComfyUI's IMAGE item) or uint8."""
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise Flux2KitError(
                f"A reference image must be an image (height, width, channels with 1, 3 or 4 channels); got an array of shape {tuple(image.shape)}."
            )
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if image.shape[2] == 1:
            image = image[:, :, 0]
        return PIL.Image.fromarray(image)
    raise Flux2KitError(f"A reference must be an image; got {type(image).__name__}.")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, with transparency composited onto white and grayscale expanded."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def check_reference(image: PIL.Image.Image, number: int = 1) -> None:
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise Flux2KitError(f"Reference image {number} is {w}x{h}; both sides must be at least {MIN_SIDE} pixels. Use a larger image.")
    ratio = max(w / h, h / w)
    if ratio > MAX_ASPECT:
        raise Flux2KitError(
            f"Reference image {number} is {w}x{h} (aspect {ratio:.1f}:1); the aspect ratio must be at most 8:1. Crop it first."
        )


def prepare_reference(image, *, max_pixels: int = MEGAPIXEL, number: int = 1) -> torch.Tensor:
    """One reference as a (1, 3, h, w) tensor in [-1, 1]: RGB, at most ``max_pixels`` (LANCZOS), centre-cropped to multiples of 16."""
    pil = to_pil(image)
    check_reference(pil, number)
    w, h = pil.size
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        pil = pil.resize((int(w * scale), int(h * scale)), PIL.Image.Resampling.LANCZOS)
        w, h = pil.size
    cw, ch = (w // 16) * 16, (h // 16) * 16
    left, top = (w - cw) // 2, (h - ch) // 2
    pil = to_rgb(pil.crop((left, top, left + cw, top + ch)))
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    # (1, H, W, 3) permuted, the memory layout diffusers' image processor gives the VAE: the convolutions then
    # add in the same order, so the latents match to the last bit (see editing.encode_start).
    return torch.from_numpy(arr).unsqueeze(0).permute(0, 3, 1, 2) * 2.0 - 1.0


def split_images(images) -> list:
    """Flatten a list of images, where an item may be a ComfyUI IMAGE batch (B, H, W, C)."""
    out = []
    for item in images or []:
        if isinstance(item, torch.Tensor) and item.ndim == 4:
            out.extend(item[i] for i in range(item.shape[0]))
        else:
            out.append(item)
    return out


def reference_ids(latent_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Position ids (1, N, 4) for references with latent sizes (h, w): T = 10 * i for reference i (1-based)."""
    ids = []
    for i, (h, w) in enumerate(latent_sizes, start=1):
        t = torch.tensor([10 * i])
        ids.append(torch.cartesian_prod(t, torch.arange(h), torch.arange(w), torch.arange(1)))
    return torch.cat(ids, dim=0).unsqueeze(0)


def encode_references(vae, images, *, max_pixels: int | None = None, max_count: int = MAX_REFERENCES) -> References | None:
    """Encode 1-10 reference images with the VAE into reference tokens; None for no images.

    ``max_pixels`` defaults to 1 MP each; a single reference may be allowed up to 4 MP.
    """
    images = split_images(images)
    if not images:
        return None
    if len(images) > max_count:
        raise Flux2KitError(f"{len(images)} reference images were given; at most {max_count} are supported. Remove some.")
    limit = max_pixels or MEGAPIXEL
    if len(images) > 1:
        limit = min(limit, MEGAPIXEL)
    tokens, latent_sizes, sizes = [], [], []
    first_size = to_pil(images[0]).size
    for number, image in enumerate(images, start=1):
        pixels = prepare_reference(image, max_pixels=limit, number=number)
        latent = vae.encode(pixels.to(vae.device, vae.dtype))  # (1, 128, h, w), normalized
        _, c, h, w = latent.shape
        tokens.append(latent.reshape(1, c, h * w).permute(0, 2, 1))
        latent_sizes.append((h, w))
        sizes.append((pixels.shape[-1], pixels.shape[-2]))
    return References(tokens=torch.cat(tokens, dim=1), ids=reference_ids(latent_sizes), sizes=sizes,
                      first_size=first_size)


def latent_references(latents: list[torch.Tensor]) -> References | None:
    """References from FLUX.2 latents (each (1 or B, 128, h, w), e.g. core ReferenceLatent's), numbered in order."""
    if not latents:
        return None
    batch = max(int(lat.shape[0]) for lat in latents)
    tokens, latent_sizes = [], []
    for lat in latents:
        if lat.shape[0] not in (1, batch):
            raise Flux2KitError(f"Reference latents come in batches of {lat.shape[0]} and {batch}; use one image per "
                                "reference or the same batch size for all.")
        b, c, h, w = lat.shape
        tokens.append(lat.float().reshape(b, c, h * w).permute(0, 2, 1).expand(batch, -1, -1))
        latent_sizes.append((h, w))
    sizes = [(16 * w, 16 * h) for h, w in latent_sizes]
    return References(tokens=torch.cat(tokens, dim=1), ids=reference_ids(latent_sizes), sizes=sizes,
                      first_size=sizes[0])


def join_references(*parts: References | None) -> References | None:
    """One set of references from several, numbered 1..N in the order given (T = 10, 20, ...)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    batch = max(int(p.tokens.shape[0]) for p in parts)
    for p in parts:
        if p.tokens.shape[0] not in (1, batch):
            raise Flux2KitError(f"References come in batches of {p.tokens.shape[0]} and {batch}; use one image per "
                                "reference or the same batch size for all.")
    like = parts[0].tokens
    tokens = torch.cat([p.tokens.to(like).expand(batch, -1, -1) for p in parts], dim=1)
    sizes = [size for p in parts for size in p.sizes]
    return References(tokens=tokens, ids=reference_ids([(h // 16, w // 16) for w, h in sizes]), sizes=sizes,
                      first_size=parts[0].first_size)
