"""The example images the shipped workflows load: drawn by the pack's code, small, licensed, installed when missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.fixture(scope="module")
def examples(comfy):
    from flux2kit.nodes import example_inputs

    return example_inputs


def named_images() -> dict[str, set[str]]:
    """Every image a shipped workflow's LoadImage names -> the workflow files naming it (UI and API format)."""
    found: dict[str, set[str]] = {}
    for path in sorted(WORKFLOWS.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data.get("nodes"), list):
            names = [n["widgets_values"][0] for n in data["nodes"] if n.get("type") == "LoadImage"]
        else:
            names = [n["inputs"]["image"] for n in data.values() if isinstance(n, dict) and n.get("class_type") == "LoadImage"]
        for name in names:
            found.setdefault(name, set()).add(str(path.relative_to(WORKFLOWS)))
    return found


def test_every_image_a_shipped_workflow_names_is_shipped(examples):
    named = named_images()
    assert named, "no LoadImage in the shipped workflows?"
    missing = {name: files for name, files in named.items() if name not in examples.NAMES}
    assert not missing, f"images no example provides: {missing}"
    for name in named:
        assert (examples.FOLDER / name).is_file(), name


NAMES = ["flux2kit_person.png", "flux2kit_jacket.png", "flux2kit_street.png", "flux2kit_cottage.png",
         "flux2kit_cottage_inpaint.png", "flux2kit_teapot.png", "flux2kit_pattern.png"]


def test_the_examples_are_the_ones_the_workflows_need(examples):
    assert list(examples.NAMES) == NAMES
    assert sorted(p.name for p in examples.FOLDER.glob("*.png")) == sorted(NAMES)  # nothing else ships there


@pytest.mark.parametrize("name", NAMES)
def test_the_shipped_file_is_what_the_code_draws(examples, name):
    path = examples.FOLDER / name
    assert path.stat().st_size <= 8 * 1024, "a few KB each"
    drawn = examples.draw(name)
    with PIL.Image.open(path) as image:
        assert image.info.get("Copyright") == examples.LICENCE and image.info.get("Software") == "flux2kit"
        assert image.mode == drawn.mode  # the inpaint example's hole is its transparency
        shipped = np.asarray(image)
    assert np.array_equal(shipped, np.asarray(drawn))


def test_the_inpaint_example_is_the_cottage_with_a_transparent_hole(examples):
    """Load Image makes MASK = 1 - alpha: the hole is what the inpaint workflow repaints; the rest is the cottage."""
    rgba = np.asarray(examples.draw("flux2kit_cottage_inpaint.png"))
    cottage = np.asarray(examples.draw("flux2kit_cottage.png"))
    left, top, right, bottom = examples.HOLE
    hole = np.zeros(cottage.shape[:2], dtype=bool)
    hole[top:bottom + 1, left:right + 1] = True
    assert (rgba[..., 3][hole] == 0).all() and (rgba[..., 3][~hole] == 255).all()
    assert np.array_equal(rgba[..., :3], cottage)
    assert cottage.shape == (256, 384, 3)  # sides multiples of 16: VAE Encode crops nothing


def test_the_licence_is_stated(examples):
    text = (examples.FOLDER / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in text and "nodes/example_inputs.py" in text
    assert all(name in text for name in examples.NAMES)


def test_install_copies_what_is_missing_and_keeps_the_users_files(examples, tmp_path):
    mine = PIL.Image.new("RGB", (8, 8), (1, 2, 3))
    mine.save(tmp_path / "flux2kit_jacket.png")  # the user's own picture under that name
    assert examples.install(str(tmp_path)) == [n for n in NAMES if n != "flux2kit_jacket.png"]
    assert (tmp_path / "flux2kit_person.png").read_bytes() == (examples.FOLDER / "flux2kit_person.png").read_bytes()
    with PIL.Image.open(tmp_path / "flux2kit_jacket.png") as kept:
        assert kept.size == (8, 8)
    assert examples.install(str(tmp_path)) == []  # nothing left to copy
    assert examples.install(str(tmp_path / "new" / "input")) == list(examples.NAMES)  # the folder is made
