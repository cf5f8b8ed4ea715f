"""The flux2kit engine: FLUX.2 checkpoints, models, generation, prompt builders and the hosted API client.

Pure torch/diffusers/transformers; this package never imports ComfyUI. Sub-packages, one concept each:

- ``files``: what is on disk (safetensors, checkpoint layouts, FP8 storage, tokenizers, quantize/save);
- ``models``: the torch models built from those files (transformer, text encoder, VAE, FP8 layers);
- ``generation``: the request and its checks, references, the schedule and sampling loop, ``generate``;
- ``prompting``: HEX palettes, structured JSON prompts and prompt upsampling;
- ``hosted``: the client of the hosted FLUX.2 APIs (Black Forest Labs, Oxen.ai);
- ``demo_models``: tiny random FLUX.2 models for the demo and the tests (never used by product code).

The names below are the public API; they are imported on first use, so ``import flux2kit.pipelines``
stays cheap::

    from flux2kit.pipelines import load_transformer, load_text_encoder, load_vae, generate, GenerationRequest
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # errors
    "Flux2KitError": "errors", "UnsupportedFormatError": "errors",
    # the parameter contract
    "ASPECT_RATIOS": "parameters", "RESOLUTIONS": "parameters", "DEFAULTS": "parameters",
    "resolve_size": "parameters", "defaults_for": "parameters",
    # loading
    "load_transformer": "models.transformer", "Flux2Transformer": "models.transformer",
    "load_text_encoder": "models.text_encoder", "Flux2TextEncoder": "models.text_encoder",
    "PromptEmbeds": "models.text_encoder",
    "load_full_text_encoder": "models.full_text_encoder", "FullTextEncoder": "models.full_text_encoder",
    "upsample_prompt": "prompting.upsample", "Upsampled": "prompting.upsample",
    "load_vae": "models.vae", "Flux2VAE": "models.vae",
    "inspect_transformer": "files.transformer_checkpoint", "inspect_text_encoder": "files.text_encoder_checkpoint",
    # LoRAs
    "read_lora": "files.lora_formats", "apply_loras": "models.lora", "LoraEntry": "models.lora",
    # quantize / save
    "save_fp8_transformer": "files.quantize", "save_text_encoder_file": "files.quantize",
    # generation and its stages
    "GenerationRequest": "generation.request", "CheckedRequest": "generation.request",
    "generate": "generation.generate", "sample": "generation.generate", "decode": "generation.generate",
    "encode_references": "generation.references", "References": "generation.references",
    "Cancelled": "generation.sampling",
    # editing and core ComfyUI conditioning
    "Edit": "generation.editing", "encode_start": "generation.editing",
    "read_core_conditioning": "generation.conditioning",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
