"""The example images the shipped workflows load (flux2kit_person.png, ...): drawn in code, installed into ComfyUI's input folder.

The PNG files ship in ``workflows/example_inputs/`` (licence: README.md there); ``draw`` makes each one
from flat shapes, so anyone can check that nothing third-party is in them (a test redraws them and
compares pixels). When ComfyUI loads the pack, ``install`` copies the ones missing from the input
folder, so the reference workflows open with their images instead of red LoadImage nodes; a file the
user already has under that name is never overwritten. Standard library only, apart from Pillow in
``draw``: no engine, no ComfyUI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "workflows" / "example_inputs"
NAMES = ("flux2kit_person.png", "flux2kit_jacket.png", "flux2kit_street.png")
SIZE = (256, 320)  # small (a few KB each); the reference encoders scale them as they scale any image
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

    image = Image.new("RGB", SIZE, (0, 0, 0))
    pen = ImageDraw.Draw(image)
    {"flux2kit_person.png": _person, "flux2kit_jacket.png": _jacket, "flux2kit_street.png": _street}[name](pen)
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
