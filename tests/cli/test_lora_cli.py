"""LoRAs from the command line: ``flux2kit generate --lora``, decimal sweeps in ``flux2kit batch``, and the shipped
LoRA workflow run headless on the tiny demo models."""

import contextlib
import io
import json
import os
import sqlite3

import numpy as np
import PIL.Image
import pytest

from flux2kit.pipelines.demo_models import DEMO_FILES
from flux2kit.pipelines.errors import Flux2KitError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API = os.path.join(REPO, "workflows", "api")
FAST = dict(size=(64, 64), steps=2, prompt="tinystyle, a lighthouse", seed=4)


def run_cli(*argv):
    from flux2kit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo(comfy):
    models = comfy / "models"
    return {kind: str(models / rel) for kind, rel in DEMO_FILES.items()}


def test_lora_and_strength_come_in_pairs():
    from flux2kit.cli import build_parser

    parse = build_parser().parse_args
    base = ["generate", "--transformer", "t", "--text-encoder", "e", "--vae", "v"]
    args = parse(base + ["--lora", "C:\\loras\\a.safetensors", "--lora-strength", "0.8", "--lora", "b.safetensors",
                         "--lora", "c.safetensors", "--lora-strength", "-1.5"])
    assert args.loras == [{"file": "C:\\loras\\a.safetensors", "strength": 0.8},
                          {"file": "b.safetensors", "strength": None},  # 1 when the file is read
                          {"file": "c.safetensors", "strength": -1.5}]
    assert parse(base).loras == []
    for bad in (["--lora-strength", "0.5"], ["--lora", "a", "--lora-strength", "1", "--lora-strength", "2"]):
        code, _, err = run_cli(*base, *bad)
        assert code == 2 and "--lora-strength X goes right after the --lora FILE it applies to" in err


def _generate(demo, out, *extra):
    return run_cli("generate", "--transformer", demo["transformer"], "--text-encoder", demo["text_encoder"],
                   "--vae", demo["vae"], "--prompt", "tinystyle, a fox", "--width", 64, "--height", 64, "--steps", 2,
                   "--seed", 3, "--device", "cpu", "--out", out, *extra)


def test_generate_with_stacked_loras(demo, tmp_path):
    code, plain, err = _generate(demo, tmp_path / "plain")
    assert code == 0, err
    code, stdout, err = _generate(demo, tmp_path / "lora", "--lora", demo["lora"], "--lora-strength", 0.8,
                                  "--lora", demo["lora"])
    assert code == 0, err
    assert "LoRA flux2_dev_tiny_lora.safetensors at 0.8: ComfyUI/BFL (diffusion_model., lora_A/lora_B, alpha); " \
           "31 of 31 layers, rank 4, alpha 4." in err
    path = stdout.strip().splitlines()[-1]
    with PIL.Image.open(path) as im:
        meta = json.loads(im.text["parameters"])
        with_lora = np.asarray(im.convert("RGB"))
    assert meta["loras"] == [{"file": "flux2_dev_tiny_lora.safetensors", "strength": 0.8},
                             {"file": "flux2_dev_tiny_lora.safetensors", "strength": 1.0}]
    with PIL.Image.open(plain.strip().splitlines()[-1]) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), with_lora)


def test_generate_refuses_a_mismatched_lora_before_loading(demo, tmp_path):
    from flux2kit.pipelines.demo_models import lora as demo_lora
    from flux2kit.pipelines.demo_models.transformer import tiny_transformer_config

    wide = demo_lora.random_lora(tiny_transformer_config(num_attention_heads=3), rank=1, seed=0, layers=["img_in"])
    path = demo_lora.save_lora(wide, str(tmp_path / "wide.safetensors"))
    code, _, err = _generate(demo, tmp_path / "out", "--lora", path)
    assert code == 2
    assert "wide.safetensors is a LoRA for a FLUX.2-architecture model 384 wide (width 384), but the transformer is " \
           "FLUX.2 [dev] (width 256)" in err
    assert "Loading the text encoder" not in err  # refused from the headers, before any model loads
    code, _, err = _generate(demo, tmp_path / "out", "--lora", tmp_path / "absent.safetensors")
    assert code == 2 and "LoRA not found" in err


def test_generate_with_a_lora_on_a_gguf_transformer(demo, tmp_path):
    """Side branch on the demo's GGUF Q8_0 twin; --lora-merge refused from the file's header, before anything loads."""
    gguf = dict(demo, transformer=demo["transformer_gguf"])
    code, plain, err = _generate(gguf, tmp_path / "plain")
    assert code == 0, err
    code, stdout, err = _generate(gguf, tmp_path / "lora", "--lora", demo["lora"], "--lora-strength", 0.8)
    assert code == 0, err
    assert "LoRA flux2_dev_tiny_lora.safetensors at 0.8" in err and "GGUF Q8_0 x23, BF16 x8, F32 x12" in err
    with PIL.Image.open(stdout.strip().splitlines()[-1]) as im, PIL.Image.open(plain.strip().splitlines()[-1]) as p:
        assert json.loads(im.text["parameters"])["loras"] == [{"file": "flux2_dev_tiny_lora.safetensors",
                                                               "strength": 0.8}]
        assert not np.array_equal(np.asarray(im.convert("RGB")), np.asarray(p.convert("RGB")))
    code, _, err = _generate(gguf, tmp_path / "merged", "--lora", demo["lora"], "--lora-merge")
    assert code == 2
    assert "--lora-merge cannot be used with flux2_dev_tiny_q8_0.gguf: it is a GGUF transformer (GGUF Q8_0 x23, " \
           "BF16 x8, F32 x12) whose layers stay packed GGUF blocks and are never re-quantized" in err
    assert "side branch only" in err and "Leave out --lora-merge." in err
    assert "Loading the text encoder" not in err and not (tmp_path / "merged").exists()


def test_decimal_sweeps():
    from flux2kit.cli.batch.inputs import parse_sweep

    assert parse_sweep("Flux2KitLoraLoader.strength=0..1:0.25") == ("Flux2KitLoraLoader.strength",
                                                                    [0.0, 0.25, 0.5, 0.75, 1.0])
    assert parse_sweep("strength=0..1:0.1")[1][3] == 0.3  # exact decimals, not 0.30000000000000004
    assert parse_sweep("strength=-1..1:0.5")[1] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert parse_sweep("seed=1..3") == ("seed", [1, 2, 3])  # whole numbers stay whole
    with pytest.raises(Flux2KitError, match="a range goes up"):
        parse_sweep("strength=1..0:0.25")


def test_strength_sweep_over_the_lora_workflow(comfy, tmp_path):
    out = tmp_path / "sweep"
    code, _, err = run_cli("batch", os.path.join(API, "lora_text_to_image.json"), "--out", out, "--target", "local",
                           "--models", comfy / "models", "--sweep", "LoRA 1: a style.strength=0..1:0.5",
                           "--set", "size=64x64", "--set", "steps=1", "--set", "LoRA 2: a character.enabled=false")
    assert code == 0, err
    db = sqlite3.connect(os.path.join(out, "batch.sqlite"))
    try:
        rows = db.execute("SELECT job, name, outputs FROM jobs ORDER BY job").fetchall()
    finally:
        db.close()
    assert [r[1] for r in rows] == ["00001-strength-0-0", "00002-strength-0-5", "00003-strength-1-0"]
    images = [np.asarray(PIL.Image.open(json.loads(r[2])[0]).convert("RGB")) for r in rows]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_lora_workflow_headless(comfy, tmp_path):
    """Off = no LoRA (the same image as text_to_image); a strength change re-runs only the LoRA nodes onwards."""
    from flux2kit.cli.local_runner import LocalRunner
    from flux2kit.cli.workflow.files import load_workflow
    from flux2kit.cli.workflow.overrides import apply_overrides

    messages = []
    runner = LocalRunner(str(comfy / "models"), str(tmp_path / "out"), input_dir=str(tmp_path), demo=True,
                         log=messages.append)
    lora_wf = apply_overrides(load_workflow(os.path.join(API, "lora_text_to_image.json")), **FAST)
    plain_wf = apply_overrides(load_workflow(os.path.join(API, "text_to_image.json")), **FAST)

    def image(wf):
        with PIL.Image.open(runner.run(wf)[0]) as im:
            return np.asarray(im.convert("RGB"))

    with_loras = image(lora_wf)
    assert any("31 of 31 layers, rank 4, alpha 4" in m for m in messages)  # the node's status text
    lora_wf["9"]["inputs"]["strength"] = 0.3
    weaker = image(lora_wf)
    assert runner.cached == ["1", "2", "3", "4"]  # the loaders and the prompt: the file is not read again either
    assert not np.array_equal(weaker, with_loras)
    for nid in ("9", "10"):
        lora_wf[nid]["inputs"]["enabled"] = False
    assert np.array_equal(image(lora_wf), image(plain_wf))
