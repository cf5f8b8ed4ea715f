"""The FLUX.2 VAE: load it from either real layout, encode images to latents, decode them back.

FLUX.2 latents are the VAE's 32 channels at 1/8 scale, patchified 2x2 to 128 channels at 1/16 and
normalized with the VAE's batch-norm statistics. ``encode``/``decode`` reproduce diffusers'
``Flux2Pipeline`` (``_encode_vae_image`` and the decode at the end of ``__call__``) exactly.
The model is built on the meta device and tensors are streamed in one at a time, so no second copy
of the weights exists. File layouts and names: files/vae_checkpoint.py.
"""

from __future__ import annotations

import json
import os

import torch
from diffusers import AutoencoderKLFlux2
from torch import Tensor

from ..devices import default_dtype
from ..errors import Flux2KitError
from ..files.safetensors import TensorFile, safetensors_files_in
from ..files.vae_checkpoint import (
    GET_FLUX2_VAE,
    OPTIONAL_KEYS,
    PATCH,
    check_is_flux2_vae,
    check_no_duplicates,
    diffusers_rename_map,
    is_attn_projection,
    ldm_rename_map,
    not_a_vae_message,
    sample_names,
    vae_config_from_ldm,
    vae_prefix,
)
from .meta import assign

# --------------------------------------------------------------------------------------------
# Latent layout (same semantics as diffusers Flux2Pipeline._patchify_latents/_unpatchify_latents)


def patchify_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); channel order (c, dy, dx)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2)
    latents = latents.permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


def unpatchify_latents(latents: Tensor) -> Tensor:
    """Inverse of :func:`patchify_latents`: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c // 4, 2, 2, h, w)
    latents = latents.permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(b, c // 4, h * 2, w * 2)


# --------------------------------------------------------------------------------------------
# The loaded VAE


class Flux2VAE:
    """A FLUX.2 VAE ready for inference: images in [-1, 1] <-> normalized 128-channel latents."""

    def __init__(self, model: AutoencoderKLFlux2, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell (16 for the real VAE)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1) * PATCH

    def _bn_mean_std(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.model.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.model.config.batch_norm_eps)
        std = std.to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1], H and W multiples of 16 -> normalized latents (B, 128, H/16, W/16)."""
        s = self.scale_factor
        if images.ndim != 4 or images.shape[1] != self.model.config.in_channels:
            raise Flux2KitError(
                f"The VAE encodes images of shape (batch, 3, height, width); got {tuple(images.shape)}."
            )
        if images.shape[-2] % s or images.shape[-1] % s:
            raise Flux2KitError(
                f"FLUX.2 needs image sides that are multiples of {s}; got {images.shape[-1]}x{images.shape[-2]}. "
                f"Crop or resize the image to multiples of {s}."
            )
        images = images.to(self.device, self.dtype)
        latents = self.model.encode(images).latent_dist.mode()  # the mean: FLUX.2 never samples here
        latents = patchify_latents(latents)
        mean, std = self._bn_mean_std(latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalized latents (B, 128, h, w) -> images (B, 3, 16h, 16w) in about [-1, 1], not clamped."""
        expected = PATCH * PATCH * self.model.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != expected:
            raise Flux2KitError(
                f"The FLUX.2 VAE decodes latents of shape (batch, {expected}, height, width); "
                f"got {tuple(latents.shape)}. "
                "Latents from another model family (FLUX.1, SD) cannot be decoded by this VAE."
            )
        latents = latents.to(self.device, self.dtype)
        mean, std = self._bn_mean_std(latents)
        latents = unpatchify_latents(latents * std + mean)
        return self.model.decode(latents, return_dict=False)[0]

    def to(self, device: str | torch.device) -> "Flux2VAE":
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def __repr__(self) -> str:
        c = self.model.config
        return f"Flux2VAE(block_out_channels={tuple(c.block_out_channels)}, device={self.device}, dtype={self.dtype})"


# --------------------------------------------------------------------------------------------
# Loading


def _resolve_diffusers_folder(path: str) -> tuple[str, dict | None]:
    """(folder with the VAE weights, its config.json or None) for a pipeline root or a vae folder."""
    folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
    config_path = os.path.join(folder, "config.json")
    config = None
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise Flux2KitError(f"{config_path} is not valid JSON ({e}). Download the VAE folder again.") from None
    return folder, config


def build_on_meta(config: dict) -> AutoencoderKLFlux2:
    with torch.device("meta"):
        return AutoencoderKLFlux2.from_config(config)


def load_vae(path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Flux2VAE:
    """Load a FLUX.2 VAE from a BFL/ComfyUI single file or a diffusers folder (pipeline root or ``vae/``)."""
    path = os.fspath(path)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if not os.path.exists(path):
        raise Flux2KitError(
            f"VAE not found: {path}. Check the path, or put flux2-vae.safetensors in ComfyUI/models/vae."
        )

    folder_config = None
    if os.path.isdir(path):
        folder, folder_config = _resolve_diffusers_folder(path)
        files = safetensors_files_in(folder, "diffusion_pytorch_model")
    else:
        files = [path]

    with TensorFile.open(files) as tf:
        name = os.path.basename(path.rstrip(os.sep)) or path
        all_keys = tf.keys()
        prefix = vae_prefix(all_keys)
        if prefix is None:
            raise Flux2KitError(not_a_vae_message(name, all_keys))
        if prefix == "":
            file_keys = all_keys
        else:  # an all-in-one checkpoint: other components live outside the prefix
            file_keys = [k for k in all_keys if k.startswith(prefix)]
        shapes = {k[len(prefix):]: tf.info(k).shape for k in file_keys}
        check_is_flux2_vae(name, shapes, all_keys)

        is_ldm = any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in shapes)
        if is_ldm:
            rename, unknown = ldm_rename_map(shapes)
            ldm_shapes = shapes
        else:
            rename = {k: k for k in shapes}
            to_ldm, unknown = diffusers_rename_map(shapes)
            ldm_shapes = {to_ldm[k]: s for k, s in shapes.items() if k in to_ldm}
        if unknown:
            raise Flux2KitError(
                f"{name} has keys a FLUX.2 VAE does not have: {sample_names(unknown)}. It is not a FLUX.2 VAE or it is "
                f"damaged. {GET_FLUX2_VAE}"
            )
        check_no_duplicates(rename)

        config = folder_config if folder_config is not None else vae_config_from_ldm(ldm_shapes)
        try:
            model = build_on_meta(config)
        except (TypeError, ValueError) as e:
            raise Flux2KitError(f"{name}: cannot build a FLUX.2 VAE from its config ({e}). {GET_FLUX2_VAE}") from None
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

        missing = [k for k in expected if k not in rename.values() and k not in OPTIONAL_KEYS]
        extra = [k for k in rename.values() if k not in expected]
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"missing {sample_names(missing)}")
            if extra:
                problems.append(f"unexpected {sample_names(extra)}")
            raise Flux2KitError(
                f"{name} does not match the FLUX.2 VAE architecture ({'; '.join(problems)}). The file is damaged or "
                f"from another model. {GET_FLUX2_VAE}"
            )
        for old, new in rename.items():
            file_shape = tuple(shapes[old])
            want = expected[new]
            if file_shape != want and not (is_attn_projection(new) and file_shape == want + (1, 1)):
                raise Flux2KitError(
                    f"{name}: {prefix + old} has shape {file_shape}, expected {want}. The file is damaged or does not "
                    f"match its config.json. {GET_FLUX2_VAE}"
                )

        # Stream: one tensor in memory at a time besides the model itself.
        for old, new in rename.items():
            t = tf.get(prefix + old)
            if is_attn_projection(new) and t.ndim == 4:
                t = t[:, :, 0, 0]
            if t.is_floating_point():
                t = t.to(dtype)
            assign(model, new, t.to(device).contiguous())
    if "bn.num_batches_tracked" not in rename.values():
        assign(model, "bn.num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))

    model.eval().requires_grad_(False)
    return Flux2VAE(model, device, dtype)
