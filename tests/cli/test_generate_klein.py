"""``flux2kit generate`` on FLUX.2 [klein]: the tiny [klein] files and Qwen3 of tests/conftest.py."""

import os

import numpy as np
import pytest

from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.models.vae import load_vae


@pytest.fixture(scope="module")
def vae(tiny_vae):
    return load_vae(tiny_vae[1], device="cpu")


@pytest.fixture(scope="module")
def text_encoder(qwen3):
    return load_text_encoder(qwen3[2], device="cpu")


@pytest.mark.parametrize("mode", ["distilled", "base"])
def test_cli_generate_runs_klein_with_its_defaults(mode, klein_files, qwen3, tiny_vae, text_encoder, vae, tmp_path,
                                                   capsys):
    """`flux2kit generate` on [klein]: the model's default steps/guidance, CFG for base, same image as generate()."""
    import PIL.Image

    from flux2kit import cli
    from flux2kit.pipelines.generation.generate import generate
    from flux2kit.pipelines.parameters import DEFAULTS

    path = klein_files["bfl", None]
    argv = ["generate", "--transformer", path, "--text-encoder", qwen3[2], "--vae", tiny_vae[1], "--prompt",
            "a red kite", "--width", "64", "--height", "80", "--seed", "5", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 2  # the file does not say which [klein]: the CLI asks, like the loader
    assert "--klein-mode" in capsys.readouterr().err
    assert cli.main([*argv, "--klein-mode", mode]) == 0
    [png] = [p for p in os.listdir(tmp_path) if p.endswith(".png")]
    saved = np.asarray(PIL.Image.open(tmp_path / png).convert("RGB"))
    defaults = DEFAULTS["klein-distilled" if mode == "distilled" else "klein-base"]
    t = load_transformer(path, device="cpu", klein_mode=mode)
    expected = generate(t, text_encoder, vae, prompt="a red kite", width=64, height=80, seed=5,
                        num_inference_steps=defaults["num_inference_steps"], guidance=defaults["guidance"])
    assert np.array_equal(saved, (expected[0].numpy() * 255).round().astype(np.uint8))
