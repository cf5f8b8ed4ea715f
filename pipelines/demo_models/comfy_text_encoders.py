"""The tiny Mistral-Small-3.x and Qwen3 text encoders saved as ComfyUI single files (bf16 or FP8).

The same weights as the Hugging Face folders ``save_tiny_mistral3`` / ``save_tiny_qwen3`` write,
under ComfyUI's names (``model.layers.N...``), with the Mistral tokenizer inside as the
``tekken_model`` tensor: a tekken JSON built from the tiny vocabulary, which gives the same token
ids as the tiny Hugging Face tokenizer. Qwen3 files carry no tokenizer, as ComfyUI's do not.
"""

from __future__ import annotations

import torch

from ..files.quantize import write_comfy_text_encoder
from ..files.safetensors import StateDictFiles
from ..files.tokenizers import tekken_from_tokenizer


def _language_model_state(model, prefix: str, num_layers: int | None) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            continue  # vision tower, projector, LM head: not in ComfyUI's files
        name = key[len(prefix):]
        if num_layers is not None and name.startswith("layers.") and int(name.split(".")[1]) >= num_layers:
            continue
        if num_layers is not None and name.startswith("norm."):
            continue  # a pruned file ends before the final norm
        state[prefix + name] = value.detach().to(torch.bfloat16).contiguous()
    return state


def save_tiny_mistral3_comfy(model, tokenizer, path: str, *, fp8: bool = False, num_layers: int | None = None,
                             tekken: bool = True) -> str:
    """Write a tiny ``Mistral3ForConditionalGeneration`` as ComfyUI's ``mistral_3_small_flux2_*`` file.

    ``fp8``: decoder linears as float8_e4m3fn with per-tensor scales (ComfyUI's current format);
    ``num_layers``: keep only the first layers (like the pruned 30-layer files);
    ``tekken=False`` leaves the tokenizer out (a damaged download, for error tests).
    """
    prefix = "model.language_model."
    files = StateDictFiles(_language_model_state(model, prefix, num_layers), name=path)
    data = tekken_from_tokenizer(tokenizer) if tekken else None
    return write_comfy_text_encoder(files, prefix, model.config.text_config, path, quantize=fp8, tekken=data)


def save_tiny_qwen3_comfy(model, path: str, *, fp8: bool = False, num_layers: int | None = None) -> str:
    """Write a tiny ``Qwen3ForCausalLM`` as ComfyUI's ``qwen_3_4b*`` file (no tokenizer inside)."""
    prefix = "model."
    files = StateDictFiles(_language_model_state(model, prefix, num_layers), name=path)
    return write_comfy_text_encoder(files, prefix, model.config, path, quantize=fp8)
