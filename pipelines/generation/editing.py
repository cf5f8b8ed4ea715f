"""Editing: start images and latents, inpaint masks, crop-and-stitch, and pasting the result back.

An edit starts from clean latents (ComfyUI's FLUX.2 LATENT: 128 channels at 1/16, batch-norm
normalised) instead of noise. ``denoise`` says how much of the schedule runs (ComfyUI KSampler's
meaning, see ``sampling.denoise_schedule``); a mask (1 = repaint) keeps the rest of the start image at
every step. Masks are handled as diffusers' FLUX.2 inpaint pipeline does by default: binarized at 0.5
at the image's pixel size, then resized bilinearly (no antialias) to the latent grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import Flux2KitError
from ..parameters import MAX_PIXELS, MAX_SIDE, MEGAPIXEL, MIN_SIDE, SIZE_MULTIPLE

LATENT_CHANNELS = 128
MASK_MODES = ("binary", "soft")
# Latents of other models, by channel count: named in the error so the user knows what they wired.
_FOREIGN_LATENTS = {
    4: "a Stable Diffusion 1.x/2.x or SDXL latent (4 channels)",
    16: "an SD3 or FLUX.1 latent (16 channels)",
    32: "a FLUX.2 VAE latent before patchifying (32 channels at 1/8)",
}
ASPECT_TOLERANCE = 0.01  # a mask may differ from the image's aspect by 1% (rounding of scaled sizes)


@dataclass
class Edit:
    """Where sampling starts and what it may change.

    ``latents``: clean start latents (1 or B, 128, h, w). ``mask``: (1 or B, 16h, 16w) in [0, 1] at
    the latents' pixel size, 1 = repaint, or None (the whole image). ``source_as_reference`` appends
    the clean start latents as a reference before any other (diffusers' FLUX.2 inpaint pipeline always
    does). ``crop_margin`` > 0 samples only the mask's bounding box plus this many pixels.
    """

    latents: torch.Tensor
    denoise: float = 1.0
    mask: torch.Tensor | None = None
    mask_mode: str = "binary"
    source_as_reference: bool = True
    crop_margin: int = 0

    @property
    def empty_start(self) -> bool:
        """An all-zero latent (core's Empty Latent Image): it only sets the size."""
        return not bool(torch.count_nonzero(self.latents))


def mask_is_empty(pixel_mask: torch.Tensor, grid: tuple[int, int], mode: str = "binary") -> bool:
    """True when the mask marks no latent cell for repainting (so sampling would change nothing)."""
    return not bool((latent_mask(pixel_mask, grid, mode) > 0).any())


def edit_outcome(denoise: float, pixel_mask: torch.Tensor | None, grid: tuple[int, int],
                 mode: str = "binary") -> str | None:
    """Why an edit changes nothing (then the start is returned unchanged), or None when it runs."""
    if denoise <= 0:
        return "denoise is 0: nothing is repainted, the start image is returned unchanged."
    if pixel_mask is not None and mask_is_empty(pixel_mask, grid, mode):
        return ("The mask is empty (nothing is white, or nothing at 0.5 or above): nothing will change, the start "
                "image is returned unchanged. Paint the area to repaint white.")
    return None


def edit_batch_size(start_batch: int, batch_size: int) -> int:
    """The batch of an edit: the start's when it has several images, else ``batch_size`` (seeds seed + i)."""
    if start_batch == 1 or batch_size in (1, start_batch):
        return max(start_batch, batch_size)
    raise Flux2KitError(f"The start holds {start_batch} images but batch_size is {batch_size}: set batch_size to 1 "
                        f"(one result per start image) or {start_batch}, or start from a single image.")


def batch_of(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``tensor`` with ``batch`` items: a single item is repeated; another count is an error."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise Flux2KitError(f"The {what} holds {tensor.shape[0]} items but the batch is {batch}: give one {what} for all "
                        f"or one per image.")


# -- start latents and images -----------------------------------------------------------------------

def check_latent(samples, *, what: str = "The LATENT") -> torch.Tensor:
    """A ComfyUI LATENT's samples as (B, 128, h, w) float, or an error naming the kind of latent it is."""
    if not isinstance(samples, torch.Tensor):
        raise Flux2KitError(f"{what} has no samples tensor; connect a LATENT (from FLUX.2 VAE Encode, core VAE "
                            "Encode with the FLUX.2 VAE, or Empty Flux 2 Latent).")
    if samples.ndim == 5:
        raise Flux2KitError(f"{what} is a video latent {tuple(samples.shape)}; FLUX.2 edits images: encode an image "
                            "with the FLUX.2 VAE.")
    if samples.ndim != 4:
        raise Flux2KitError(f"{what} has shape {tuple(samples.shape)}; a FLUX.2 LATENT is (batch, 128, height/16, "
                            "width/16).")
    channels = samples.shape[1]
    if channels != LATENT_CHANNELS:
        kind = _FOREIGN_LATENTS.get(channels, f"a {channels}-channel latent of another model")
        raise Flux2KitError(
            f"{what} is {kind}, not a FLUX.2 latent (128 channels at 1/16). Encode the image with the FLUX.2 VAE "
            "(FLUX.2 VAE Encode, or core VAE Encode with flux2-vae.safetensors)."
        )
    return samples.float()


def empty_latent_size(latent: dict) -> tuple[int, int] | None:
    """(width, height) in pixels of an all-zero LATENT (core's empty latent nodes), else None.

    Like ComfyUI's KSampler, an empty latent of another channel count only gives the size: core's Empty
    Latent Image (4 channels at 1/8) carries ``downscale_ratio_spacial`` = 8 for that.
    """
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or torch.count_nonzero(samples):
        return None
    ratio = int(latent.get("downscale_ratio_spacial") or SIZE_MULTIPLE)
    return samples.shape[-1] * ratio, samples.shape[-2] * ratio


def check_start_size(width: int, height: int, *, what: str = "The start image") -> None:
    """Our limits for what an edit starts from: sides 64-4096 and at most 4 MP; never resized silently."""
    problems = []
    if width * height > MAX_PIXELS:
        problems.append(f"is {width}x{height} ({width * height / MEGAPIXEL:.2f} MP), over FLUX.2's 4 MP maximum")
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        problems.append(f"is {width}x{height}; each side must be {MIN_SIDE}-{MAX_SIDE} pixels")
    if problems:
        raise Flux2KitError(f"{what} {' and '.join(problems)}. flux2kit does not resize it silently: scale or crop "
                            "it first (e.g. core 'Upscale Image' or 'ImageScaleToTotalPixels').")


def crop_to_multiple(images: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Centre-crop (B, H, W, C) to multiples of ``multiple``, as ComfyUI's VAE Encode does (offset (d % m) // 2)."""
    for dim in (1, 2):
        size = images.shape[dim]
        keep = (size // multiple) * multiple
        if keep != size:
            images = images.narrow(dim, (size % multiple) // 2, keep)
    return images


def image_tensor(image) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, 3) float in [0, 1] from an IMAGE, one (H, W, C) image, a PIL image or array."""
    from .references import to_pil

    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return image[..., :3].float().cpu()
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image.unsqueeze(0)
        return (image.expand(-1, -1, -1, 3) if image.shape[-1] == 1 else image[..., :3]).float().cpu()
    pil = to_pil(image).convert("RGB")  # as ComfyUI's Load Image: transparency is the mask, not the colour
    import numpy as np

    return torch.from_numpy(np.asarray(pil, dtype="float32") / 255.0).unsqueeze(0)


def encode_start(vae, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) in [0, 1], sides multiples of 16 -> clean FLUX.2 latents (B, 128, H/16, W/16) on the CPU."""
    # (B, H, W, 3) contiguous, then permuted: the memory layout diffusers' image processor gives the VAE (and
    # references.prepare_reference), so equal pixels give bit-equal latents whichever path encodes them.
    with torch.inference_mode():
        latents = vae.encode((pixels.contiguous().movedim(-1, 1) * 2.0 - 1.0).to(vae.device, vae.dtype))
    return latents.float().cpu()


PIXELS_KEY = "flux2kit_pixels"  # a LATENT's source pixels (FLUX.2 VAE Encode adds them): what paste-back restores
PASTE_KEY = "flux2kit_paste"  # on the Sampler's LATENT: {"pixels", "mask", "mode"} for FLUX.2 Decode to paste back


def latent_dict(samples: torch.Tensor, *, pixels: torch.Tensor | None = None,
                noise_mask: torch.Tensor | None = None) -> dict:
    """A ComfyUI LATENT with flux2kit's extras (core nodes copy unknown keys along and otherwise ignore them)."""
    out = {"samples": samples.contiguous()}
    if noise_mask is not None:
        out["noise_mask"] = noise_mask.reshape(-1, 1, *noise_mask.shape[-2:])
    if pixels is not None:
        out[PIXELS_KEY] = pixels
    return out


def edit_from_latent(latent: dict, *, denoise: float, mask=None, mask_mode: str = "binary",
                     source_as_reference: bool = True, crop_margin: int = 0) -> tuple[Edit, list[str]]:
    """An :class:`Edit` from a ComfyUI LATENT (ours, core VAE Encode's, or an empty one), and notes for the user.

    ``mask`` (a MASK) wins over the LATENT's ``noise_mask`` (core Set Latent Noise Mask / VAE Encode (for
    Inpainting)); either may have any size of the image's aspect ratio.
    """
    if not isinstance(latent, dict):
        raise Flux2KitError("The latent input is not a ComfyUI LATENT; connect FLUX.2 VAE Encode, core VAE Encode or "
                            "Empty Flux 2 Latent.")
    notes = []
    size = empty_latent_size(latent)
    if size is not None:  # core's empty latents: the size (and batch) only
        samples = torch.zeros(latent["samples"].shape[0], LATENT_CHANNELS, size[1] // SIZE_MULTIPLE,
                              size[0] // SIZE_MULTIPLE)
    else:
        samples = check_latent(latent.get("samples"))
    h, w = samples.shape[-2:]
    pixel_mask = None
    if mask is not None:
        if latent.get("noise_mask") is not None:
            notes.append("The mask input is used; the LATENT's noise_mask is ignored.")
        pixel_mask = fit_mask(mask, SIZE_MULTIPLE * w, SIZE_MULTIPLE * h)
    elif latent.get("noise_mask") is not None:
        pixel_mask = fit_mask(latent["noise_mask"], SIZE_MULTIPLE * w, SIZE_MULTIPLE * h)
    edit = Edit(samples.float(), denoise=denoise, mask=pixel_mask, mask_mode=mask_mode,
                source_as_reference=source_as_reference, crop_margin=crop_margin)
    if edit.empty_start:
        notes.append("The LATENT is empty: it sets the size only (not a start image, not a reference).")
    return edit, notes


def source_pixels(latent: dict, width: int, height: int) -> torch.Tensor | None:
    """The source pixels a LATENT carries (FLUX.2 VAE Encode's), when they match its size; else None."""
    pixels = latent.get(PIXELS_KEY) if isinstance(latent, dict) else None
    if isinstance(pixels, torch.Tensor) and pixels.ndim == 4 and tuple(pixels.shape[1:3]) == (height, width):
        return pixels
    return None


# -- masks -------------------------------------------------------------------------------------------

def mask_tensor(mask) -> torch.Tensor:
    """A ComfyUI MASK (B, H, W) float from a MASK, a LATENT's noise_mask (B, 1, H, W), a PIL image or an array."""
    if isinstance(mask, torch.Tensor):
        m = mask.detach().float().cpu()
    else:
        import numpy as np
        import PIL.Image

        if isinstance(mask, PIL.Image.Image):
            mask = np.asarray(mask.convert("L"), dtype="float32") / 255.0
        m = torch.as_tensor(np.asarray(mask, dtype="float32"))
    if m.ndim < 2 or m.ndim > 4 or (m.ndim == 4 and m.shape[1] != 1):
        raise Flux2KitError(f"A mask must be (height, width) or a batch of them; got shape {tuple(m.shape)}.")
    return m.reshape(-1, m.shape[-2], m.shape[-1])


def fit_mask(mask, width: int, height: int, *, original: tuple[int, int] | None = None) -> torch.Tensor:
    """The mask at the image's pixel size (B, height, width), or an error when it does not belong to the image.

    A mask of the image before its centre crop to multiples of 16 (``original`` size, or any size that
    crops to ``width`` x ``height``) gets the same crop; a mask of the same aspect ratio is resized
    (bilinear, as ComfyUI resizes masks); another aspect ratio is refused.
    """
    m = mask_tensor(mask)
    mh, mw = m.shape[-2:]
    if (mw, mh) == (width, height):
        return m
    if (mw // SIZE_MULTIPLE * SIZE_MULTIPLE, mh // SIZE_MULTIPLE * SIZE_MULTIPLE) == (width, height) or (
            original is not None and (mw, mh) == original):
        return crop_to_multiple(m.unsqueeze(-1)).squeeze(-1)
    if abs((mw / mh) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise Flux2KitError(
            f"The mask is {mw}x{mh} (aspect {mw / mh:.3f}) but the image is {width}x{height} (aspect "
            f"{width / height:.3f}): it does not belong to this image. Draw the mask on this image (the mask editor, "
            "or core nodes such as Image To Mask), or crop/scale it to the image first."
        )
    return F.interpolate(m.unsqueeze(1), size=(height, width), mode="bilinear").squeeze(1)


def latent_mask(pixel_mask: torch.Tensor, grid: tuple[int, int], mode: str = "binary") -> torch.Tensor:
    """(B, 1, h, w) on the latent grid from a pixel mask (B, H, W), as diffusers' FLUX.2 inpaint pipeline does.

    "binary" (diffusers): binarized at 0.5 first, then bilinear without antialias, so the latent mask is
    0 or 1 except where an edge falls between the two pixels at a cell's centre. "soft" skips the
    binarization (ComfyUI's noise_mask handling), so feathered masks blend gradually.
    """
    if mode not in MASK_MODES:
        raise Flux2KitError(f"Unknown mask mode {mode!r}; use one of {', '.join(MASK_MODES)}.")
    m = pixel_mask.float().unsqueeze(1)
    if mode == "binary":
        m = (m >= 0.5).float()
    return F.interpolate(m, size=tuple(grid), mode="bilinear")


def paste_mask(pixel_mask: torch.Tensor, mode: str = "binary") -> torch.Tensor:
    """Where the decoded result replaces the original (B, H, W) when pasting back: the mask as sampled."""
    return (pixel_mask >= 0.5).float() if mode == "binary" else pixel_mask.float().clamp(0.0, 1.0)


def paste_back(images: torch.Tensor, source: torch.Tensor, pixel_mask: torch.Tensor, mode: str = "binary") -> torch.Tensor:
    """Decoded IMAGE (B, H, W, 3) over the source outside the mask, so untouched pixels stay bit-exact."""
    m = paste_mask(pixel_mask, mode).unsqueeze(-1).to(images.dtype)
    source = source.to(images.dtype).expand(images.shape[0], -1, -1, -1)
    if mode == "binary":
        return torch.where(m > 0, images, source)
    return source * (1 - m) + images * m


# -- crop and stitch ---------------------------------------------------------------------------------

def mask_box(grid_mask: torch.Tensor, margin: int, *, min_cells: int = MIN_SIDE // SIZE_MULTIPLE):
    """(top, left, bottom, right) in latent cells: the masked cells' bounding box over the whole batch, grown by
    ``margin`` pixels (rounded up to cells), at least 64 pixels a side, within the image."""
    _, _, h, w = grid_mask.shape
    hit = (grid_mask > 0).any(dim=0).any(dim=0)
    rows, cols = torch.nonzero(hit.any(dim=1)).flatten(), torch.nonzero(hit.any(dim=0)).flatten()
    grow = math.ceil(margin / SIZE_MULTIPLE)
    top, bottom = max(int(rows[0]) - grow, 0), min(int(rows[-1]) + 1 + grow, h)
    left, right = max(int(cols[0]) - grow, 0), min(int(cols[-1]) + 1 + grow, w)
    top, bottom = _widen(top, bottom, min_cells, h)
    left, right = _widen(left, right, min_cells, w)
    return top, left, bottom, right


def _widen(lo: int, hi: int, least: int, size: int) -> tuple[int, int]:
    """Grow [lo, hi) to at least ``least`` cells, on both sides in turn, staying within [0, size)."""
    least = min(least, size)
    while hi - lo < least:
        if lo > 0:
            lo -= 1
        if hi - lo < least and hi < size:
            hi += 1
    return lo, hi
