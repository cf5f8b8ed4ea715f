"""The flux2kit command: the demo on tiny random models, generate on the same files, errors and Ctrl-C."""

import contextlib
import io
import json
import os
import signal

import numpy as np
import PIL.Image
import pytest

from flux2kit.cli import arguments, terminal
from flux2kit.pipelines.demo_models import DEMO_PROMPT
from flux2kit.cli import main


def run(*argv):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def model_files(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run with default size and prompt; the models and output folders stay for the other tests."""
    models, out = tmp_path_factory.mktemp("demo-models"), tmp_path_factory.mktemp("output")
    code, stdout, stderr = run("demo", "--models", models, "--out", out, "--steps", 2)
    assert code == 0, stderr
    return {"models": models, "out": out, "stdout": stdout, "stderr": stderr}


def demo_paths(models):
    from flux2kit.pipelines.demo_models import build_demo_models

    return build_demo_models(str(models))


def png_parameters(path):
    with PIL.Image.open(path) as im:
        return im.size, np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])


def test_demo_builds_models_and_saves_a_png_with_its_parameters(demo):
    assert "Building tiny demo models" in demo["stderr"] and "RANDOM weights" in demo["stderr"]
    path = demo["stdout"].strip().splitlines()[-1]
    assert os.path.isabs(path) and os.path.dirname(path) == str(demo["out"]) and path.endswith(".png")
    size, pixels, params = png_parameters(path)
    assert size == (256, 256)
    assert pixels.std() > 5  # an image, not a constant
    assert params["prompt"] == DEMO_PROMPT and params["seed"] == 0 and params["num_inference_steps"] == 2
    assert "step 2/2" in demo["stderr"]
    with open(os.path.join(demo["models"], "README.txt"), encoding="utf-8") as f:
        assert "RANDOM weights" in f.read()
    for name in ("diffusion_models", "text_encoders", "vae"):  # ComfyUI's models layout
        assert os.listdir(os.path.join(demo["models"], name))


def test_second_demo_reuses_the_models(demo):
    files = model_files(demo["models"])
    before = {f: os.stat(f).st_mtime_ns for f in files}
    code, stdout, stderr = run("demo", "--models", demo["models"], "--out", demo["out"], "--steps", 1,
                               "--size", "192x128", "--prompt", "a tiny café ☕", "--seed", 7)
    assert code == 0, stderr
    assert "Using the tiny demo models" in stderr and "Building" not in stderr
    assert {f: os.stat(f).st_mtime_ns for f in model_files(demo["models"])} == before
    path = stdout.strip().splitlines()[-1]
    assert path != demo["stdout"].strip().splitlines()[-1]  # numbered after the first image, not over it
    size, _, params = png_parameters(path)
    assert size == (192, 128)
    assert params["prompt"] == "a tiny café ☕" and params["seed"] == 7


def test_generate_with_a_reference_image_and_a_batch(demo, tmp_path):
    paths = demo_paths(demo["models"])
    ref = tmp_path / "ref.png"
    gradient = np.linspace(0, 255, 160 * 120 * 3).reshape(120, 160, 3).astype(np.uint8)
    PIL.Image.fromarray(gradient).save(ref)
    code, stdout, stderr = run(
        "generate", "--transformer", paths["transformer"], "--text-encoder", paths["text_encoder"],
        "--vae", paths["vae"], "--prompt", "the fox from image 1", "--image", ref, "--width", 128, "--height", 96,
        "--steps", 2, "--seed", 5, "--batch-size", 2, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 0, stderr
    saved = stdout.strip().splitlines()
    assert len(saved) == 2 and all(os.path.exists(p) for p in saved)
    images = []
    for i, path in enumerate(saved):
        size, pixels, params = png_parameters(path)
        assert size == (128, 96)
        assert params["seed"] == 5 + i and params["references"] == ["ref.png"] and params["guidance"] == 4.0
        assert params["models"]["transformer"] == "flux2_dev_tiny_fp8mixed.safetensors"
        assert not any(os.sep in str(v) for v in params["models"].values())  # names only, no local paths
        images.append(pixels)
    assert not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("extra, message", [
    (["--width", 1000, "--height", 1024], "The nearest valid size is"),
    (["--image", "/no/such/image.png"], "Reference image 1 not found"),
    (["--steps", 0], "num_inference_steps must be 1-50"),
])
def test_errors_print_the_message_and_exit_2(demo, tmp_path, extra, message):
    paths = demo_paths(demo["models"])
    code, stdout, stderr = run("generate", "--transformer", paths["transformer"], "--text-encoder",
                               paths["text_encoder"], "--vae", paths["vae"], "--prompt", "x", "--out", tmp_path, *extra)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert stdout == "" and os.listdir(tmp_path) == []


def test_ctrl_c_cancels_before_the_next_step(demo, tmp_path, monkeypatch):
    show = terminal.Progress.__call__

    def press_ctrl_c_after_step_1(self, step, total, latents=None):
        show(self, step, total, latents)
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(terminal.Progress, "__call__", press_ctrl_c_after_step_1)
    handler = signal.getsignal(signal.SIGINT)
    code, stdout, stderr = run("demo", "--models", demo["models"], "--out", tmp_path, "--steps", 3, "--size", "64x64")
    assert code == 130
    assert "step 1/3" in stderr and "step 2/3" not in stderr and "cancelled" in stderr
    assert stdout == "" and os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is handler  # put back


def test_argument_parsing():
    assert arguments.parse_resolution("1MP") == "1 MP" and arguments.parse_resolution("0.5") == "0.5 MP"
    assert arguments.parse_resolution("2 mp") == "2 MP"
    assert arguments.parse_size("1024x768") == (1024, 768)
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        main(["demo", "--size", "big"])
    assert e.value.code == 2
