"""A tiny random FLUX.2 VAE, saved in the real file layouts (BFL/ComfyUI single file, diffusers folder).

Same architecture family as the real VAE (four levels, so 1/8 scale and 1/16 after patchify; 32
latent channels; batch-norm statistics), with narrow channels so it runs in milliseconds on CPU.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKLFlux2
from safetensors.torch import save_file

from ..files.vae_checkpoint import convert_diffusers_vae_to_ldm


def tiny_vae_config() -> dict:
    """Config of the tiny VAE. Channels are multiples of 32 because the real VAE's GroupNorms use
    32 groups (and single-file loading assumes it); the width change exercises shortcut convs."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 32,
        "norm_num_groups": 32,
        "sample_size": 256,
    }


def build_tiny_vae(seed: int = 0, config: dict | None = None) -> AutoencoderKLFlux2:
    """Random tiny VAE (fp32, eval) with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**(config or tiny_vae_config()))
    with torch.no_grad():
        n = model.bn.running_mean.numel()
        model.bn.running_mean.copy_(torch.randn(n) * 0.5)
        model.bn.running_var.copy_(torch.rand(n) * 2.0 + 0.25)
        model.bn.num_batches_tracked.fill_(1000)
    return model.eval().requires_grad_(False)


def save_vae_ldm(model: AutoencoderKLFlux2, path: str, prefix: str = "", dtype: torch.dtype = torch.float32) -> str:
    """Write ``model`` as one safetensors file with BFL/ComfyUI (LDM) key names, e.g. flux2-vae.safetensors."""
    ldm = convert_diffusers_vae_to_ldm(model.state_dict())
    tensors = {
        prefix + k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in ldm.items()
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def save_vae_diffusers(model: AutoencoderKLFlux2, folder: str) -> str:
    """Write ``model`` as a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder
