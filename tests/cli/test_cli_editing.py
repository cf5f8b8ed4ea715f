"""``flux2kit generate --start-image``: image-to-image and inpainting from the command line, on the demo models."""

import contextlib
import io
import json

import numpy as np
import PIL.Image
import pytest

from flux2kit.cli import main


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_models(comfy):
    from flux2kit.pipelines.demo_models import build_demo_models

    return build_demo_models(str(comfy / "models"))


def test_transparent_area_of_the_start_image_is_the_mask(demo_models, tmp_path):
    rng = np.random.default_rng(0)
    rgba = np.concatenate([(rng.uniform(0, 1, (70, 100, 3)) * 255).astype(np.uint8),
                           np.full((70, 100, 1), 255, np.uint8)], axis=-1)
    rgba[20:50, 30:70, 3] = 0  # the hole to repaint
    start = tmp_path / "start.png"
    PIL.Image.fromarray(rgba, "RGBA").save(start)
    p = demo_models
    code, stdout, stderr = run("generate", "--transformer", p["transformer"], "--text-encoder", p["text_encoder"],
                               "--vae", p["vae"], "--prompt", "a window", "--start-image", start, "--denoise", 0.7,
                               "--steps", 2, "--seed", 1, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 0, stderr
    path = stdout.strip().splitlines()[-1]
    with PIL.Image.open(path) as im:
        out = np.asarray(im.convert("RGB"))
        params = json.loads(im.text["parameters"])
    assert out.shape == (64, 96, 3)  # centre-cropped to multiples of 16: offsets 3 and 2
    src = rgba[3:67, 2:98, :3]
    hole = rgba[3:67, 2:98, 3] == 0
    assert np.array_equal(out[~hole], src[~hole])  # pasted back exactly
    assert np.abs(out[hole].astype(int) - src[hole]).mean() > 3
    assert params["start_image"] == "start.png" and params["denoise"] == 0.7


def test_mask_without_a_start_image_is_refused(demo_models, tmp_path):
    p = demo_models
    code, _, stderr = run("generate", "--transformer", p["transformer"], "--text-encoder", p["text_encoder"],
                          "--vae", p["vae"], "--prompt", "x", "--mask", tmp_path / "m.png", "--out", tmp_path)
    assert code == 2 and "--mask needs --start-image" in stderr
