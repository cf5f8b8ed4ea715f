"""``flux2kit generate --upsample`` on the tiny demo models: the engine's upsampled text (itself checked against
diffusers in tests/pipelines/test_prompt_upsampling.py) is what gets encoded, printed and saved in the PNG."""

import contextlib
import io
import json

import numpy as np
import PIL.Image
import pytest

from flux2kit.cli import main
from flux2kit.pipelines.demo_models import build_demo_models
from flux2kit.pipelines.models.full_text_encoder import load_full_text_encoder
from flux2kit.pipelines.prompting.upsample import upsample_prompt

N = 4


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_demo_models(str(tmp_path_factory.mktemp("demo-models")))


def png(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])


def test_upsampled_prompt_is_encoded_printed_and_saved(paths, tmp_path):
    ref = tmp_path / "ref.png"
    PIL.Image.fromarray(np.linspace(0, 255, 96 * 80 * 3).reshape(80, 96, 3).astype(np.uint8)).save(ref)
    common = ["--transformer", paths["transformer"], "--text-encoder", paths["text_encoder"], "--vae", paths["vae"],
              "--image", ref, "--width", 64, "--height", 64, "--steps", 1, "--seed", 9, "--device", "cpu"]
    code, stdout, stderr = run("generate", *common, "--prompt", "the fox from image 1", "--upsample",
                               "--upsample-temperature", 0.9, "--upsample-max-new-tokens", N, "--out", tmp_path / "a")
    assert code == 0, stderr
    expected = upsample_prompt(load_full_text_encoder(paths["text_encoder"]), "the fox from image 1",
                               [PIL.Image.open(ref)], temperature=0.9, seed=9, max_new_tokens=N).text
    pixels, params = png(stdout.strip().splitlines()[-1])
    assert params["prompt"] == expected and params["original_prompt"] == "the fox from image 1"
    assert params["upsampling"] == {"mode": "image-to-image", "temperature": 0.9, "seed": 9, "max_new_tokens": N,
                                    "fell_back": False}
    assert f"Upsampled prompt (image-to-image):\n{expected}" in stderr
    # the image is the one the upsampled text makes when given as the prompt
    code, stdout, stderr = run("generate", *common, "--prompt", expected, "--out", tmp_path / "b")
    assert code == 0, stderr
    assert np.array_equal(png(stdout.strip().splitlines()[-1])[0], pixels)


def test_klein_upsamples_with_the_dev_encoder_only(paths, klein_files, qwen3, tmp_path):
    common = ["--transformer", klein_files["bfl", True], "--text-encoder", qwen3[2], "--vae", paths["vae"],
              "--prompt", "a fox", "--width", 64, "--height", 64, "--seed", 2, "--device", "cpu", "--upsample",
              "--upsample-max-new-tokens", 2, "--out", tmp_path]
    code, _, stderr = run("generate", *common)
    assert code == 2 and "Qwen3" in stderr and "does not upsample with Qwen3" in stderr
    code, stdout, stderr = run("generate", *common, "--upsample-text-encoder", paths["text_encoder"])
    assert code == 0, stderr
    _, params = png(stdout.strip().splitlines()[-1])
    assert params["original_prompt"] == "a fox" and params["prompt"] == upsample_prompt(
        load_full_text_encoder(paths["text_encoder"], vision=False), "a fox", seed=2, max_new_tokens=2).text
