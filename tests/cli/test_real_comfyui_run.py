"""``flux2kit run WORKFLOW --server URL`` against a real ComfyUI (``COMFYUI_PATH``) on the tiny demo models.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout; see DEVELOPERS.md. The pack inside that
server: tests/nodes/test_real_comfyui.py; the same client against the fake server: test_server_runner.py.
"""

from __future__ import annotations

import json
import os

import pytest

from flux2kit.testing.pictures import png_bytes
from flux2kit.testing.real_comfyui import REPO

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]

WORKFLOWS = REPO / "workflows" / "api"
REFERENCE_SIZES = [(96, 64, "RGB"), (64, 96, "RGB"), (80, 80, "RGBA")]  # as in tests/nodes/test_real_comfyui.py


def test_headless_run_on_the_server(comfyui, tmp_path):
    """``flux2kit run WORKFLOW --server URL``: uploads the local references, follows the run, saves the images."""
    import subprocess
    import sys

    if not (WORKFLOWS / "three_reference_edit.json").exists():
        pytest.skip("workflows/api/three_reference_edit.json is not there yet")
    wf = json.loads((WORKFLOWS / "three_reference_edit.json").read_text(encoding="utf-8"))
    unknown = sorted({v["class_type"] for v in wf.values()} - set(comfyui.object_info()))
    if unknown:  # fails early when the file uses unknown node types
        pytest.fail(f"workflows/api/three_reference_edit.json uses node types this ComfyUI does not have: {unknown}")
    names = comfyui.model_names
    refs = []
    for i, (w, h, mode) in enumerate(REFERENCE_SIZES):
        path = tmp_path / f"local_ref_{i + 1}.png"
        path.write_bytes(png_bytes(w, h, seed=10 + i, mode=mode))
        refs += ["--image", str(path)]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flux2kit.cli", "run", str(WORKFLOWS / "three_reference_edit.json"),
           "--server", comfyui.url, "--out", str(out), "--steps", "2", "--size", "64x80", "--seed", "9",
           "--set", f"Flux2KitTransformerLoader.model_name={names['transformer']}",
           "--set", f"Flux2KitTextEncoderLoader.text_encoder_name={names['text_encoder']}",
           "--set", f"Flux2KitVAELoader.vae_name={names['vae']}", *refs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}\n{comfyui.log_tail()}"
    saved = sorted(out.rglob("*.png"))
    assert saved, f"no image in {out}\n{proc.stderr[-4000:]}"
    from PIL import Image

    with Image.open(saved[0]) as im:
        assert im.size == (64, 80)
    assert sorted(p.name for p in comfyui.input_dir.rglob("local_ref_*.png")) == [
        "local_ref_1.png", "local_ref_2.png", "local_ref_3.png"], "the local references were not uploaded"


def test_the_editing_workflows_example_image_on_the_server(comfyui, tmp_path):
    """``flux2kit run workflows/api/inpaint.json --server URL``: the server has the example image (the pack installed
    it when ComfyUI loaded it), so nothing is uploaded; once it is gone from the server's input folder, the shipped
    file is uploaded into input/flux2kit/."""
    import shutil
    import subprocess
    import sys

    name = "flux2kit_cottage_inpaint.png"
    shipped = REPO / "workflows" / "example_inputs" / name
    installed = comfyui.input_dir / name
    assert installed.read_bytes() == shipped.read_bytes()
    names = comfyui.model_names

    def run(out):
        cmd = [sys.executable, "-m", "flux2kit.cli", "run", str(WORKFLOWS / "inpaint.json"), "--server", comfyui.url,
               "--out", str(out), "--steps", "2", "--seed", "9",
               "--set", f"Flux2KitTransformerLoader.model_name={names['transformer']}",
               "--set", f"Flux2KitTextEncoderLoader.text_encoder_name={names['text_encoder']}",
               "--set", f"Flux2KitVAELoader.vae_name={names['vae']}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}\n{comfyui.log_tail()}"
        from PIL import Image

        with Image.open(sorted(out.rglob("*.png"))[0]) as im:
            assert im.size == (384, 256)  # the start image's size
        return proc.stdout + proc.stderr

    assert "Uploaded" not in run(tmp_path / "out1")
    kept = tmp_path / name
    shutil.move(installed, kept)
    try:
        assert f"as 'flux2kit/{name}'" in run(tmp_path / "out2")
        assert (comfyui.input_dir / "flux2kit" / name).read_bytes() == shipped.read_bytes()
    finally:
        shutil.move(kept, installed)
