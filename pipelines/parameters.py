"""The generation parameters shared by the local nodes and the API node (docs/parameters.md): ranges, sizes, seeds.

Every constant of that contract is defined here once; nodes, the command line and the API client import it.
"""

from __future__ import annotations

import math

import torch

from .errors import Flux2KitError

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "match_input_image")
RESOLUTIONS = {"0.5 MP": 0.5, "1 MP": 1.0, "2 MP": 2.0, "4 MP": 4.0}
MEGAPIXEL = 1024 * 1024
MAX_PIXELS = 4 * MEGAPIXEL  # 4,194,304: the model's stated maximum
MIN_SIDE, MAX_SIDE, SIZE_MULTIPLE = 64, 4096, 16
STEPS_RANGE = (1, 50)
GUIDANCE_RANGE = (0.0, 10.0)
MAX_SEED = 2**64 - 1
BATCH_RANGE = (1, 16)
MAX_REFERENCES = 10
MAX_TEXT_TOKENS = 512  # FLUX.2 reads at most this many prompt tokens (chat markup included)
# Editing: denoise as ComfyUI's KSampler means it (docs/parameters.md, "Editing").
DENOISE_RANGE = (0.0, 1.0)
FULL_DENOISE = 0.9999  # above this, KSampler runs the plain schedule (no truncation)
# The longest schedule a denoise value may ask for: FLUX.2's timesteps are sigma x 1000, so a longer
# schedule's steps are finer than the model's own timestep resolution.
MAX_SCHEDULE_STEPS = 1000
OUTPUT_FORMATS = ("png", "webp", "jpeg")
RECOMMENDED_REFERENCES = {"dev": 6, "klein": 4}
# [klein] distilled and base have identical tensors: which one a file holds is read from it or set here.
# "kv" is FLUX.2 [klein] 9B KV: distilled, with references that attend only to themselves (cacheable).
KLEIN_MODES = ("auto", "distilled", "base", "kv")
DEFAULTS = {  # per model (docs/parameters.md); [klein] distilled runs without guidance
    "dev": {"num_inference_steps": 28, "guidance": 4.0},
    "klein-distilled": {"num_inference_steps": 4, "guidance": 1.0},
    "klein-base": {"num_inference_steps": 50, "guidance": 4.0},
}


def defaults_for(family: str, distilled: bool | None = None) -> dict:
    """Default steps and guidance for "dev", or "klein" distilled / base."""
    if family == "klein":
        return DEFAULTS["klein-distilled" if distilled else "klein-base"]
    return DEFAULTS["dev"]


def size_from_aspect(aspect_ratio: str, resolution: str, first_image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) for an aspect ratio and a resolution, by the rule in docs/parameters.md."""
    if resolution not in RESOLUTIONS:
        raise Flux2KitError(f"Unknown resolution {resolution!r}; use one of {', '.join(RESOLUTIONS)}.")
    if aspect_ratio == "match_input_image":
        if first_image_size is None:
            raise Flux2KitError("aspect_ratio 'match_input_image' needs a reference image; connect image 1 or pick a ratio.")
        w, h = first_image_size
        r = w / h
    elif aspect_ratio in ASPECT_RATIOS:
        a, b = aspect_ratio.split(":")
        r = int(a) / int(b)
    else:
        raise Flux2KitError(f"Unknown aspect_ratio {aspect_ratio!r}; use one of {', '.join(ASPECT_RATIOS)}.")
    pixels = RESOLUTIONS[resolution] * MEGAPIXEL
    width = SIZE_MULTIPLE * round(math.sqrt(pixels * r) / SIZE_MULTIPLE)
    height = SIZE_MULTIPLE * round(math.sqrt(pixels / r) / SIZE_MULTIPLE)
    width, height = (min(max(width, MIN_SIDE), MAX_SIDE), min(max(height, MIN_SIDE), MAX_SIDE))
    while width * height > MAX_PIXELS:
        if width >= height:
            width -= SIZE_MULTIPLE
        else:
            height -= SIZE_MULTIPLE
    return width, height


def nearest_valid_size(width: int, height: int) -> tuple[int, int]:
    """The closest size that is a multiple of 16, within 64-4096 per side and at most 4 MP."""
    snap = lambda v: min(max(SIZE_MULTIPLE * round(v / SIZE_MULTIPLE), MIN_SIDE), MAX_SIDE)  # noqa: E731
    w, h = snap(width), snap(height)
    if w * h > MAX_PIXELS:
        f = math.sqrt(MAX_PIXELS / (width * height))
        w = max(MIN_SIDE, SIZE_MULTIPLE * math.floor(width * f / SIZE_MULTIPLE))
        h = max(MIN_SIDE, SIZE_MULTIPLE * math.floor(height * f / SIZE_MULTIPLE))
    return w, h


def check_size(width: int, height: int) -> None:
    """Refuse sizes the model cannot make, naming the nearest valid size."""
    problems = []
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        problems.append("width and height must be multiples of 16")
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        problems.append(f"each side must be {MIN_SIDE}-{MAX_SIDE} pixels")
    if width * height > MAX_PIXELS:
        problems.append(f"{width}x{height} is {width * height / MEGAPIXEL:.2f} MP, over the 4 MP maximum (4,194,304 pixels)")
    if problems:
        w, h = nearest_valid_size(width, height)
        raise Flux2KitError(f"Size {width}x{height} is not valid: {'; '.join(problems)}. The nearest valid size is {w}x{h}.")


def resolve_size(aspect_ratio: str = "1:1", resolution: str = "1 MP", width: int | None = None,
                 height: int | None = None, first_image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Explicit width and height when both are set (non-zero), else the size from aspect ratio and resolution."""
    width, height = width or None, height or None
    if width is not None and height is not None:
        check_size(width, height)
        return width, height
    if (width is None) != (height is None):
        raise Flux2KitError("Set both width and height to choose an exact size, or leave both unset (0) to use aspect_ratio and resolution.")
    return size_from_aspect(aspect_ratio, resolution, first_image_size)


def check_generation(num_inference_steps: int, guidance: float, seed: int, batch_size: int) -> None:
    """Range checks with messages that say the allowed range."""
    if not STEPS_RANGE[0] <= num_inference_steps <= STEPS_RANGE[1]:
        raise Flux2KitError(f"num_inference_steps must be {STEPS_RANGE[0]}-{STEPS_RANGE[1]}, got {num_inference_steps}.")
    if not GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]:
        raise Flux2KitError(f"guidance must be {GUIDANCE_RANGE[0]:g}-{GUIDANCE_RANGE[1]:g}, got {guidance}.")
    if not 0 <= seed <= MAX_SEED:
        raise Flux2KitError(f"seed must be 0-{MAX_SEED}, got {seed}.")
    if not BATCH_RANGE[0] <= batch_size <= BATCH_RANGE[1]:
        raise Flux2KitError(f"batch_size must be {BATCH_RANGE[0]}-{BATCH_RANGE[1]}, got {batch_size}.")


def make_noise(seed: int, batch_size: int, width: int, height: int, channels: int = 128) -> torch.Tensor:
    """Initial noise (B, 128, H/16, W/16), fp32 on the CPU: image i uses seed + i (mod 2**64).

    Each image has its own CPU generator, so batch item i equals a single run with seed + i, on any
    device; at batch size 1 this is exactly what diffusers' Flux2Pipeline draws with a CPU generator.
    """
    shape = (1, channels, height // 16, width // 16)
    out = []
    for i in range(batch_size):
        g = torch.Generator("cpu").manual_seed((seed + i) % 2**64)
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.cat(out, dim=0)


def check_denoise(num_inference_steps: int, denoise: float) -> None:
    """``denoise`` in [0, 1], and (when above 0) large enough that its schedule has at most 1000 steps."""
    if not isinstance(denoise, (int, float)) or denoise != denoise or not DENOISE_RANGE[0] <= denoise <= DENOISE_RANGE[1]:
        raise Flux2KitError(f"denoise must be {DENOISE_RANGE[0]:g}-{DENOISE_RANGE[1]:g}, got {denoise}: 1 repaints "
                            "everything from noise, 0 returns the start image unchanged.")
    if 0 < denoise <= FULL_DENOISE and int(num_inference_steps / denoise) > MAX_SCHEDULE_STEPS:
        least = num_inference_steps / MAX_SCHEDULE_STEPS
        raise Flux2KitError(
            f"denoise {denoise:g} is so small that no step would change the image: with {num_inference_steps} "
            f"steps it asks for a schedule of {int(num_inference_steps / denoise)} steps, finer than FLUX.2's 1000 "
            f"timesteps. Use denoise 0 to return the start image unchanged, or at least {least:g}."
        )


def schedule_length(num_inference_steps: int, denoise: float) -> int:
    """ComfyUI's KSampler rule: ``steps`` steps run on a schedule of int(steps / denoise) steps (0: nothing runs)."""
    if denoise <= 0:
        return 0
    if denoise > FULL_DENOISE:
        return num_inference_steps
    return int(num_inference_steps / denoise)
