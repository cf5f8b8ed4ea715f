"""Shared fixtures: tiny FLUX.2-architecture models built in code and saved in the real file layouts."""

import os

import pytest
import torch

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
