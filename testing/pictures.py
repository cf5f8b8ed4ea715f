"""Deterministic test pictures: the same pixels in every run, on every machine."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image


def picture(w: int, h: int, seed: int) -> PIL.Image.Image:
    """A smooth test picture (gradients and a disc), RGB uint8; the parity tests' references."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    c = rng.uniform(0.2, 0.8, size=3)
    img = np.stack([(x / w) * c[0], (y / h) * c[1], ((x + y) / (w + h)) * c[2]], axis=-1)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, min(w, h) / 4
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, size=3)
    return PIL.Image.fromarray((img * 255).astype(np.uint8))


def png_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A small noisy gradient PNG in ``mode`` ("RGB" or "RGBA"): reference images to upload to a server."""
    import random

    rng = random.Random(seed)
    channels = len(mode)
    data = bytearray()
    for y in range(height):
        for x in range(width):
            base = (x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y + seed * 40) % 256, 255)
            data += bytes(min(255, max(0, base[c] + rng.randint(-30, 30))) if c < 3 else 200 for c in range(channels))
    buf = io.BytesIO()
    PIL.Image.frombytes(mode, (width, height), bytes(data)).save(buf, format="PNG")
    return buf.getvalue()
