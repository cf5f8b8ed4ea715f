#!/usr/bin/env python3
"""Draw the example images the shipped editing workflows load (workflows/assets/), from code only.

    python scripts/draw_example_images.py            # (re)writes workflows/assets/*.png
    python scripts/draw_example_images.py --check    # exit 1 if the shipped files differ from what this draws

Everything is drawn with Pillow from shapes and gradients (no photographs, no model output), so the
images carry no third-party rights: they are released under CC0 1.0 (workflows/assets/README.md).
tests/cli/test_example_assets.py checks that the shipped files are exactly what this script draws.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "assets")
W, H = 384, 256


def _sky_and_hills() -> Image.Image:
    y = np.linspace(0.0, 1.0, H)[:, None, None]
    top, bottom = np.array([70, 130, 200]), np.array([250, 200, 150])
    sky = (top * (1 - y) + bottom * y) * np.ones((1, W, 1))
    image = Image.fromarray(sky.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(image)
    d.ellipse((290, 30, 340, 80), fill=(255, 236, 170))  # sun
    d.polygon([(0, 190), (90, 150), (200, 180), (300, 140), (384, 170), (384, 256), (0, 256)], fill=(70, 130, 60))
    d.polygon([(0, 220), (120, 195), (260, 215), (384, 200), (384, 256), (0, 256)], fill=(95, 160, 70))
    return image


def cottage() -> Image.Image:
    """A cottage on green hills at dusk: the start image of image_to_image and outpaint."""
    image = _sky_and_hills()
    d = ImageDraw.Draw(image)
    d.rectangle((130, 140, 250, 215), fill=(225, 205, 170), outline=(90, 70, 50), width=2)  # walls
    d.polygon([(120, 142), (190, 92), (260, 142)], fill=(160, 50, 40), outline=(90, 30, 25))  # roof
    d.rectangle((178, 170, 202, 215), fill=(110, 70, 40))  # door
    d.rectangle((145, 160, 168, 182), fill=(250, 230, 120), outline=(90, 70, 50), width=2)  # windows
    d.rectangle((212, 160, 235, 182), fill=(250, 230, 120), outline=(90, 70, 50), width=2)
    d.rectangle((222, 100, 236, 128), fill=(120, 110, 100))  # chimney
    for x in (40, 330):  # trees
        d.rectangle((x - 4, 175, x + 4, 205), fill=(90, 60, 30))
        d.ellipse((x - 22, 135, x + 22, 185), fill=(40, 100, 45))
    return image


def cottage_inpaint() -> Image.Image:
    """The cottage with a transparent hole over the right-hand tree: Load Image's MASK (1 - alpha) repaints it."""
    image = cottage().convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    ImageDraw.Draw(alpha).rectangle((296, 120, 364, 212), fill=0)
    image.putalpha(alpha)
    return image


def teapot() -> Image.Image:
    """A plain teapot on a light background: reference image 1 of the multi-reference edit."""
    image = Image.new("RGB", (256, 256), (236, 232, 224))
    d = ImageDraw.Draw(image)
    d.ellipse((60, 90, 196, 210), fill=(70, 110, 170), outline=(30, 50, 90), width=3)  # body
    d.ellipse((108, 70, 148, 96), fill=(70, 110, 170), outline=(30, 50, 90), width=3)  # lid
    d.ellipse((121, 58, 135, 72), fill=(30, 50, 90))  # knob
    d.polygon([(190, 130), (236, 104), (240, 112), (196, 160)], fill=(70, 110, 170), outline=(30, 50, 90))  # spout
    d.arc((24, 110, 84, 180), 90, 270, fill=(30, 50, 90), width=8)  # handle
    return image


def pattern() -> Image.Image:
    """A colourful tile pattern: reference image 2 of the multi-reference edit (the teapot's new glaze)."""
    image = Image.new("RGB", (256, 256), (250, 245, 235))
    d = ImageDraw.Draw(image)
    colours = [(220, 70, 60), (240, 180, 40), (40, 150, 120), (60, 90, 190)]
    for row in range(8):
        for col in range(8):
            x, y = col * 32, row * 32
            c = colours[(row + col) % 4]
            d.ellipse((x + 4, y + 4, x + 28, y + 28), fill=c)
            d.rectangle((x + 13, y + 13, x + 19, y + 19), fill=(250, 245, 235))
    return image


IMAGES = {
    "flux2kit_cottage.png": cottage,
    "flux2kit_cottage_inpaint.png": cottage_inpaint,
    "flux2kit_teapot.png": teapot,
    "flux2kit_pattern.png": pattern,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare the shipped files with what this script draws")
    args = p.parse_args(argv)
    os.makedirs(ASSETS, exist_ok=True)
    stale = []
    for name, draw in IMAGES.items():
        path = os.path.join(ASSETS, name)
        image = draw()
        if args.check:
            with Image.open(path) as shipped:
                if shipped.mode != image.mode or not np.array_equal(np.asarray(shipped), np.asarray(image)):
                    stale.append(name)
        else:
            image.save(path, optimize=True)
            print(path)
    if stale:
        print("differ from what scripts/draw_example_images.py draws: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
