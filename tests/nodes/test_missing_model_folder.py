"""A loader's folder that is not there is refused before anything runs, with where to put it (on the stand-in)."""

from __future__ import annotations

import os

import pytest


def test_text_encoder_loader_names_where_a_missing_folder_goes(nodes, comfy):
    loader = nodes["Flux2KitTextEncoderLoader"]
    message = loader.validate_inputs(text_encoder_name="FLUX.2-dev/", weight_mode="fp8 as stored")
    root = os.path.join(str(comfy / "models"), "text_encoders")
    assert isinstance(message, str)
    assert message.startswith(f"The text encoder folder 'FLUX.2-dev/' is missing. Put it in {root}")
    assert f"so that {os.path.join(root, 'FLUX.2-dev')}{os.sep} holds config.json, the tokenizer files and the " \
           f"weights; for FLUX.2 [dev], the text_encoder/ and tokenizer/ folders of black-forest-labs/FLUX.2-dev" in message
    assert message.endswith("then press R to refresh the list.")
    present = loader.define_schema().inputs[0].options[0]
    assert loader.validate_inputs(text_encoder_name=present) is True
    file_message = loader.validate_inputs(text_encoder_name="mistral_missing.safetensors")
    assert file_message.startswith("Model not found: 'mistral_missing.safetensors'. Put it in one of:")


@pytest.mark.parametrize("node_type,what", [("Flux2KitTransformerLoader", "transformer"), ("Flux2KitVAELoader", "VAE")])
def test_every_loader_checks_its_folders(comfy, node_type, what):
    from flux2kit.nodes import loaders

    _, folders, kind = loaders.MODEL_INPUTS[node_type]
    assert kind == what
    message = loaders.missing_model(folders, "some-diffusers-folder/", kind)
    assert message.startswith(f"The {what} folder 'some-diffusers-folder/' is missing. Put it in ")
    assert "a diffusers FLUX.2 folder" in message
