"""Save FP8: write a FLUX.2 transformer as a ComfyUI FP8 file in models/diffusion_models."""

from __future__ import annotations

import os
import re

from comfy_api.latest import io

import folder_paths

from ..pipelines.errors import Flux2KitError
from ..pipelines.files.quantize import save_fp8_transformer
from . import services
from .types import CATEGORY


def output_path(filename: str, overwrite: bool) -> str:
    """Where the file goes: the first diffusion_models folder; a plain name ending in .safetensors."""
    name = filename.strip()
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    if not re.fullmatch(r"[\w.\- ]+", name) or name.startswith("."):
        raise Flux2KitError(
            f"{filename!r} is not a plain file name. Use letters, digits, '-', '_' and '.', without folders "
            "(the file goes to models/diffusion_models)."
        )
    try:
        folders = list(folder_paths.get_folder_paths("diffusion_models"))
    except (KeyError, AttributeError):
        folders = []
    if not folders:
        raise Flux2KitError("ComfyUI has no diffusion_models folder configured; check extra_model_paths.yaml.")
    path = os.path.join(folders[0], name)
    if os.path.exists(path) and not overwrite:
        raise Flux2KitError(f"{name} already exists in {folders[0]}. Choose another file name or turn overwrite on.")
    return path


class SaveFP8(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitSaveFP8",
            display_name="FLUX.2 Save FP8 (flux2kit)",
            category=CATEGORY,
            description="Writes a bf16 FLUX.2 transformer file as a ComfyUI FP8 (fp8mixed) file in "
                        "models/diffusion_models: block linears float8_e4m3fn with per-tensor scales, the rest "
                        "bf16. ComfyUI's own Load Diffusion Model and flux2kit's loader both read it; about half "
                        "the size. Streams one tensor at a time.",
            inputs=[
                io.Combo.Input("model_name", options=services.list_models(services.TRANSFORMER_FOLDERS,
                                                                          component="transformer"),
                               tooltip="The bf16 transformer to quantize: a file in models/diffusion_models or a "
                                       "diffusers folder."),
                io.String.Input("filename", default="flux2_fp8mixed.safetensors",
                                tooltip="Name of the FP8 file written to models/diffusion_models."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name; off: refuse, so nothing is lost by accident."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="The written file's name in diffusion_models.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model_name, filename, overwrite) -> io.NodeOutput:
        src = services.resolve_model(services.TRANSFORMER_FOLDERS, model_name)
        out = output_path(filename, overwrite)
        if os.path.abspath(out) == os.path.abspath(src):
            raise Flux2KitError("The output file is the input file; choose another file name.")
        save_fp8_transformer(src, out)
        return io.NodeOutput(os.path.basename(out))


NODES = [SaveFP8]
