"""The example images the shipped workflows load (flux2kit_person.png, ...): drawn in code, installed into ComfyUI's input folder.

The PNG files ship in ``workflows/example_inputs/`` (licence: README.md there); ``draw`` makes each one
from flat shapes, so anyone can check that nothing third-party is in them (a test redraws them and
compares pixels). When ComfyUI loads the pack, ``install`` copies the ones missing from the input
folder, so the reference and editing workflows open with their images instead of red LoadImage nodes; a
file the user already has under that name is never overwritten. ``flux2kit run`` reads ``FOLDER / name``
when its input folder lacks an example, and ``flux2kit run --server`` uploads it to a server that lacks it.
Standard library only, apart from Pillow in ``draw``: no engine, no ComfyUI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "workflows" / "example_inputs"
# Reference workflows: person, jacket, street. Editing workflows: the cottage (image_to_image, outpaint), the
# cottage with a transparent hole (inpaint: Load Image's MASK is 1 - alpha), teapot and pattern (the cached
# references of multi_reference_cached).
NAMES = ("flux2kit_person.png", "flux2kit_jacket.png", "flux2kit_street.png", "flux2kit_cottage.png",
         "flux2kit_cottage_inpaint.png", "flux2kit_teapot.png", "flux2kit_pattern.png")
SIZE = (256, 320)  # the reference pictures: small (a few KB each); the reference encoders scale them as any image
LANDSCAPE = (384, 256)  # the editing start images: sides multiples of 16, so VAE Encode crops nothing
SQUARE = (256, 256)
LICENCE = "Apache-2.0 (flux2kit); drawn by flux2kit's nodes/example_inputs.py, no third-party material"


def install(input_dir: str) -> list[str]:
    """Copy the example images missing from ``input_dir``; the names copied (an existing file is kept as it is)."""
    copied = []
    os.makedirs(input_dir, exist_ok=True)
    for name in NAMES:
        target = os.path.join(input_dir, name)
        source = FOLDER / name
        if os.path.exists(target) or not source.is_file():
            continue
        shutil.copyfile(source, target)
        copied.append(name)
    return copied


def draw(name: str):
    """The example image ``name`` as a PIL image, drawn from shapes (the shipped file holds exactly these pixels)."""
    from PIL import Image, ImageDraw

    if name == "flux2kit_cottage_inpaint.png":
        return _cottage_with_hole()
    size = {"flux2kit_cottage.png": LANDSCAPE, "flux2kit_teapot.png": SQUARE, "flux2kit_pattern.png": SQUARE}.get(name, SIZE)
    image = Image.new("RGB", size, (0, 0, 0))
    pen = ImageDraw.Draw(image)
    {"flux2kit_person.png": _person, "flux2kit_jacket.png": _jacket, "flux2kit_street.png": _street,
     "flux2kit_cottage.png": _cottage, "flux2kit_teapot.png": _teapot, "flux2kit_pattern.png": _pattern}[name](pen)
    return image


def save(name: str, folder: Path = FOLDER) -> Path:
    """Write ``draw(name)`` as PNG with its licence in the metadata (how the shipped files were made)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "flux2kit")
    info.add_text("Copyright", LICENCE)
    path = folder / name
    draw(name).save(path, format="PNG", optimize=True, pnginfo=info)
    return path


def _person(pen) -> None:
    """A woman, head and shoulders, on a plain studio background."""
    pen.rectangle((0, 0, 255, 319), fill=(196, 210, 222))
    pen.ellipse((78, 40, 178, 150), fill=(60, 38, 28))  # hair behind the head
    pen.rectangle((112, 140, 144, 180), fill=(224, 172, 140))  # neck
    pen.polygon([(40, 319), (52, 214), (96, 178), (160, 178), (204, 214), (216, 319)], fill=(236, 236, 230))  # top
    pen.ellipse((92, 60, 164, 150), fill=(232, 182, 150))  # face
    pen.chord((86, 44, 170, 112), 180, 360, fill=(60, 38, 28))  # fringe
    for x in (110, 136):
        pen.ellipse((x, 96, x + 10, 104), fill=(40, 52, 70))  # eyes
    pen.arc((114, 114, 142, 134), 20, 160, fill=(160, 60, 60), width=3)  # smile


def _jacket(pen) -> None:
    """A denim-blue jacket with a check pattern, laid flat on white."""
    pen.rectangle((0, 0, 255, 319), fill=(246, 246, 244))
    blue, seam = (52, 86, 140), (30, 52, 96)
    pen.polygon([(88, 40), (168, 40), (228, 80), (248, 230), (214, 236), (196, 120), (196, 290), (60, 290), (60, 120),
                 (42, 236), (8, 230), (28, 80)], fill=blue)
    for x in range(70, 196, 18):
        pen.line((x, 60, x, 288), fill=seam, width=2)  # the check
    for y in range(70, 290, 18):
        pen.line((62, y, 194, y), fill=seam, width=2)
    pen.polygon([(88, 40), (128, 110), (168, 40)], fill=(246, 246, 244))  # neckline
    pen.line((128, 110, 128, 290), fill=(20, 30, 50), width=3)  # zip
    for y in range(130, 280, 30):
        pen.ellipse((120, y, 136, y + 16), fill=(200, 170, 60))  # buttons


def _street(pen) -> None:
    """A street at golden hour: sky, two rows of houses, the road vanishing in the middle."""
    pen.rectangle((0, 0, 255, 319), fill=(250, 196, 120))  # sky
    pen.ellipse((150, 60, 210, 120), fill=(255, 236, 170))  # low sun
    pen.polygon([(0, 319), (100, 190), (156, 190), (255, 319)], fill=(90, 88, 92))  # road
    pen.line((128, 200, 128, 319), fill=(240, 220, 120), width=4)  # centre line
    for side, xs in (("left", (0, 40, 80)), ("right", (176, 216))):
        for i, x in enumerate(xs):
            top = 90 + 25 * i if side == "left" else 140 - 25 * i
            colour = ((170, 90, 70), (120, 110, 150), (150, 130, 90))[i % 3]
            pen.rectangle((x, top, x + 40, 250 if side == "left" else 240), fill=colour)
            for wy in range(top + 12, 230, 28):
                pen.rectangle((x + 8, wy, x + 18, wy + 12), fill=(255, 220, 140))
                pen.rectangle((x + 24, wy, x + 34, wy + 12), fill=(255, 220, 140))


def _cottage(pen) -> None:
    """A cottage on green hills at dusk (384 x 256): the start image of image_to_image and outpaint."""
    width, height = LANDSCAPE
    top, bottom = (70, 130, 200), (250, 200, 150)
    for y in range(height):  # the sky: a vertical gradient
        t = y / (height - 1)
        pen.line((0, y, width - 1, y), fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(top, bottom)))
    pen.ellipse((290, 30, 340, 80), fill=(255, 236, 170))  # sun
    pen.polygon([(0, 190), (90, 150), (200, 180), (300, 140), (384, 170), (384, 256), (0, 256)], fill=(70, 130, 60))
    pen.polygon([(0, 220), (120, 195), (260, 215), (384, 200), (384, 256), (0, 256)], fill=(95, 160, 70))
    pen.rectangle((130, 140, 250, 215), fill=(225, 205, 170), outline=(90, 70, 50), width=2)  # walls
    pen.polygon([(120, 142), (190, 92), (260, 142)], fill=(160, 50, 40), outline=(90, 30, 25))  # roof
    pen.rectangle((178, 170, 202, 215), fill=(110, 70, 40))  # door
    pen.rectangle((145, 160, 168, 182), fill=(250, 230, 120), outline=(90, 70, 50), width=2)  # windows
    pen.rectangle((212, 160, 235, 182), fill=(250, 230, 120), outline=(90, 70, 50), width=2)
    pen.rectangle((222, 100, 236, 128), fill=(120, 110, 100))  # chimney
    for x in (40, 330):  # trees
        pen.rectangle((x - 4, 175, x + 4, 205), fill=(90, 60, 30))
        pen.ellipse((x - 22, 135, x + 22, 185), fill=(40, 100, 45))


HOLE = (296, 120, 364, 212)  # the inpaint example's transparent rectangle (inclusive): over the right-hand tree


def _cottage_with_hole():
    """The cottage, RGBA, transparent over the right-hand tree: Load Image's MASK (1 - alpha) repaints it."""
    from PIL import Image, ImageDraw

    image = draw("flux2kit_cottage.png").convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    ImageDraw.Draw(alpha).rectangle(HOLE, fill=0)
    image.putalpha(alpha)
    return image


def _teapot(pen) -> None:
    """A plain blue teapot on a light background: reference image 1 of the multi-reference edit."""
    pen.rectangle((0, 0, 255, 255), fill=(236, 232, 224))
    pen.ellipse((60, 90, 196, 210), fill=(70, 110, 170), outline=(30, 50, 90), width=3)  # body
    pen.ellipse((108, 70, 148, 96), fill=(70, 110, 170), outline=(30, 50, 90), width=3)  # lid
    pen.ellipse((121, 58, 135, 72), fill=(30, 50, 90))  # knob
    pen.polygon([(190, 130), (236, 104), (240, 112), (196, 160)], fill=(70, 110, 170), outline=(30, 50, 90))  # spout
    pen.arc((24, 110, 84, 180), 90, 270, fill=(30, 50, 90), width=8)  # handle


def _pattern(pen) -> None:
    """A colourful tile pattern: reference image 2 of the multi-reference edit (the teapot's new glaze)."""
    pen.rectangle((0, 0, 255, 255), fill=(250, 245, 235))
    colours = [(220, 70, 60), (240, 180, 40), (40, 150, 120), (60, 90, 190)]
    for row in range(8):
        for col in range(8):
            x, y = col * 32, row * 32
            pen.ellipse((x + 4, y + 4, x + 28, y + 28), fill=colours[(row + col) % 4])
            pen.rectangle((x + 13, y + 13, x + 19, y + 19), fill=(250, 245, 235))
