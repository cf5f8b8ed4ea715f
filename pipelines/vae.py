"""The FLUX.2 VAE: load it from either real layout, encode images to latents, decode them back.

FLUX.2 latents are the VAE's 32 channels at 1/8 scale, patchified 2x2 to 128 channels at 1/16 and
normalized with the VAE's batch-norm statistics. ``encode``/``decode`` reproduce diffusers'
``Flux2Pipeline`` (``_encode_vae_image`` and the decode at the end of ``__call__``) exactly.

Two file layouts exist:
- BFL / ComfyUI single file (``flux2-vae.safetensors``): LDM names (``encoder.down.0.block.0...``,
  ``encoder.quant_conv``, ``decoder.post_quant_conv``, ``bn.running_mean``), attention
  projections stored as 1x1 convolutions, optionally under a prefix such as ``vae.``;
- diffusers folder (``vae/config.json`` + ``diffusion_pytorch_model.safetensors``).
The layout is read from the safetensors header, never from file names. The model is built on the
meta device and tensors are streamed in one at a time, so no second copy of the weights exists.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping

import torch
from diffusers import AutoencoderKLFlux2
from torch import Tensor

from .devices import default_dtype
from .errors import Flux2KitError
from .safetensors_io import TensorFile, safetensors_files_in

# BFL's flux2 AutoEncoder hard-codes these (src/flux2/autoencoder.py); nothing in a file says otherwise.
_BATCH_NORM_EPS = 1e-4
_NORM_NUM_GROUPS = 32
_PATCH = 2
FLUX2_LATENT_CHANNELS = 32

_GET_FLUX2_VAE = (
    "FLUX.2 needs its own VAE (flux2-vae.safetensors, 32 latent channels with batch-norm statistics): "
    "download it into ComfyUI/models/vae and select it."
)


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
# Key names: LDM (BFL / ComfyUI) <-> diffusers

_RESNET_PARTS = {
    "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut",
}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    # BFL nests the quant convs in encoder/decoder; ComfyUI's VAE Save writes them at top level.
    "encoder.quant_conv": "quant_conv",
    "quant_conv": "quant_conv",
    "decoder.post_quant_conv": "post_quant_conv",
    "post_quant_conv": "post_quant_conv",
}
# diffusers -> BFL spelling (the layout of the real flux2-vae.safetensors)
_TOP_LEVEL_TO_BFL = {v: k for k, v in _TOP_LEVEL.items() if k.startswith(("encoder.", "decoder."))}
_RESNET_PARTS_TO_LDM = {v: k for k, v in _RESNET_PARTS.items()}
_ATTN_PARTS_TO_LDM = {v: k for k, v in _ATTN_PARTS.items()}
_BN_KEYS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
_OPTIONAL_KEYS = {"bn.num_batches_tracked"}  # bookkeeping only; some exports drop it

_LDM_RESNET = re.compile(r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)")
_LDM_SAMPLE = re.compile(r"(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)")
_LDM_MID_RESNET = re.compile(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)")
_LDM_MID_ATTN = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)")

_DIF_RESNET = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)")
_DIF_SAMPLE = re.compile(
    r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(weight|bias)"
)
_DIF_MID_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)")
_DIF_MID_ATTN = re.compile(
    r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)"
)


def _num_levels(names: Iterable[str], pattern: str) -> int:
    found = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
    return max(found) + 1 if found else 0


def _ldm_to_diffusers_name(name: str, num_up: int) -> str | None:
    """diffusers name of one LDM tensor name (no prefix), or None if it is not a FLUX.2 VAE key."""
    if name in _BN_KEYS:
        return name
    head, _, leaf = name.rpartition(".")
    if head in _TOP_LEVEL and leaf in ("weight", "bias"):
        return f"{_TOP_LEVEL[head]}.{leaf}"
    if m := _LDM_RESNET.fullmatch(name):
        coder, kind, level, block, part, leaf = m.groups()
        if part not in _RESNET_PARTS or (coder, kind) not in (("encoder", "down"), ("decoder", "up")):
            return None
        level = int(level) if coder == "encoder" else num_up - 1 - int(level)  # LDM counts up-levels from the top
        return f"{coder}.{kind}_blocks.{level}.resnets.{block}.{_RESNET_PARTS[part]}.{leaf}"
    if m := _LDM_SAMPLE.fullmatch(name):
        coder, kind, level, sampler, leaf = m.groups()
        if (coder, kind, sampler) == ("encoder", "down", "downsample"):
            return f"encoder.down_blocks.{level}.downsamplers.0.conv.{leaf}"
        if (coder, kind, sampler) == ("decoder", "up", "upsample"):
            return f"decoder.up_blocks.{num_up - 1 - int(level)}.upsamplers.0.conv.{leaf}"
        return None
    if m := _LDM_MID_RESNET.fullmatch(name):
        part = _RESNET_PARTS.get(m[3])
        return None if part is None else f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{part}.{m[4]}"
    if m := _LDM_MID_ATTN.fullmatch(name):
        part = _ATTN_PARTS.get(m[2])
        return None if part is None else f"{m[1]}.mid_block.attentions.0.{part}.{m[3]}"
    return None


def _diffusers_to_ldm_name(name: str, num_up: int) -> str | None:
    """LDM name (BFL spelling) of one diffusers tensor name, or None if it is not a VAE key."""
    if name in _BN_KEYS:
        return name
    head, _, leaf = name.rpartition(".")
    if head in _TOP_LEVEL_TO_BFL and leaf in ("weight", "bias"):
        return f"{_TOP_LEVEL_TO_BFL[head]}.{leaf}"
    if m := _DIF_RESNET.fullmatch(name):
        coder, kind, level, block, part, leaf = m.groups()
        if part not in _RESNET_PARTS_TO_LDM or (coder, kind) not in (("encoder", "down"), ("decoder", "up")):
            return None
        level = int(level) if coder == "encoder" else num_up - 1 - int(level)
        return f"{coder}.{kind}.{level}.block.{block}.{_RESNET_PARTS_TO_LDM[part]}.{leaf}"
    if m := _DIF_SAMPLE.fullmatch(name):
        coder, kind, level, sampler, leaf = m.groups()
        if (coder, kind, sampler) == ("encoder", "down", "downsamplers"):
            return f"encoder.down.{level}.downsample.conv.{leaf}"
        if (coder, kind, sampler) == ("decoder", "up", "upsamplers"):
            return f"decoder.up.{num_up - 1 - int(level)}.upsample.conv.{leaf}"
        return None
    if m := _DIF_MID_RESNET.fullmatch(name):
        part = _RESNET_PARTS_TO_LDM.get(m[3])
        return None if part is None else f"{m[1]}.mid.block_{int(m[2]) + 1}.{part}.{m[4]}"
    if m := _DIF_MID_ATTN.fullmatch(name):
        return f"{m[1]}.mid.attn_1.{_ATTN_PARTS_TO_LDM[m[2]]}.{m[3]}"
    return None


def _is_attn_projection(diffusers_name: str) -> bool:
    """q/k/v/out weights: 1x1 conv (C, C, 1, 1) in LDM files, linear (C, C) in diffusers."""
    return ".attentions.0." in diffusers_name and diffusers_name.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    )


def _ldm_rename_map(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """(LDM name -> diffusers name, names that are not FLUX.2 VAE keys)."""
    names = list(names)
    num_up = _num_levels(names, r"decoder\.up\.(\d+)\.")
    mapping, unknown = {}, []
    for name in names:
        new = _ldm_to_diffusers_name(name, num_up)
        if new is None:
            unknown.append(name)
        else:
            mapping[name] = new
    return mapping, unknown


def _diffusers_rename_map(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    names = list(names)
    num_up = _num_levels(names, r"decoder\.up_blocks\.(\d+)\.")
    mapping, unknown = {}, []
    for name in names:
        new = _diffusers_to_ldm_name(name, num_up)
        if new is None:
            unknown.append(name)
        else:
            mapping[name] = new
    return mapping, unknown


def _check_no_duplicates(mapping: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for old, new in mapping.items():
        if new in seen:
            raise Flux2KitError(
                f"The VAE weights hold both {seen[new]!r} and {old!r}, which are the same tensor. "
                "The file is damaged or mixes two layouts; download flux2-vae.safetensors again."
            )
        seen[new] = old


def convert_ldm_vae_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM (BFL/ComfyUI) VAE state dict -> ``AutoencoderKLFlux2`` state dict. A prefix such as
    ``vae.`` or ``first_stage_model.`` is stripped; keys outside it are ignored."""
    prefix = _vae_prefix(state_dict.keys())
    if prefix is None:
        raise Flux2KitError("These weights are not a VAE (no decoder.conv_in.weight). " + _GET_FLUX2_VAE)
    names = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    mapping, unknown = _ldm_rename_map(names)
    if unknown:
        raise Flux2KitError(f"Unexpected keys for a FLUX.2 VAE in LDM layout: {_sample(unknown)}. " + _GET_FLUX2_VAE)
    _check_no_duplicates(mapping)
    out = {}
    for old, new in mapping.items():
        t = state_dict[prefix + old]
        out[new] = t[:, :, 0, 0] if _is_attn_projection(new) and t.ndim == 4 else t
    return out


def convert_diffusers_vae_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``AutoencoderKLFlux2`` state dict -> LDM names as in BFL's ``flux2-vae.safetensors``
    (attention projections become 1x1 convolution weights)."""
    mapping, unknown = _diffusers_rename_map(state_dict.keys())
    if unknown:
        raise Flux2KitError(f"Unexpected keys for a diffusers FLUX.2 VAE: {_sample(unknown)}.")
    out = {}
    for old, new in mapping.items():
        t = state_dict[old]
        out[new] = t[:, :, None, None] if _is_attn_projection(old) and t.ndim == 2 else t
    return out


def vae_config_from_ldm(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """``AutoencoderKLFlux2`` config inferred from the tensor shapes of an LDM-layout VAE (no prefix)."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise Flux2KitError(f"The VAE has no {name!r}: the file is incomplete. " + _GET_FLUX2_VAE)
        return tuple(shapes[name])

    levels = _num_levels(shapes, r"encoder\.down\.(\d+)\.")
    up_levels = _num_levels(shapes, r"decoder\.up\.(\d+)\.")
    if levels == 0 or up_levels != levels:
        raise Flux2KitError(
            f"The VAE has {levels} encoder and {up_levels} decoder levels; a FLUX.2 VAE has the same number "
            "of each. The file is damaged or not a FLUX.2 VAE. " + _GET_FLUX2_VAE
        )
    blocks = _num_levels(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    latent_channels = shape("decoder.conv_in.weight")[1]

    def has(*names: str) -> bool:
        return any(n in shapes for n in names)

    encoder_channels = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    decoder_channels = [shape(f"decoder.up.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    return {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": encoder_channels,
        "decoder_block_out_channels": None if decoder_channels == encoder_channels else decoder_channels,
        "layers_per_block": blocks,
        "act_fn": "silu",
        "latent_channels": latent_channels,
        "norm_num_groups": _NORM_NUM_GROUPS,
        "use_quant_conv": has("encoder.quant_conv.weight", "quant_conv.weight"),
        "use_post_quant_conv": has("decoder.post_quant_conv.weight", "post_quant_conv.weight"),
        "mid_block_add_attention": has("encoder.mid.attn_1.q.weight"),
        "batch_norm_eps": _BATCH_NORM_EPS,
        "batch_norm_momentum": 0.1,
        "patch_size": [_PATCH, _PATCH],
    }


# --------------------------------------------------------------------------------------------
# Telling a FLUX.2 VAE from everything else, from the header alone


def _vae_prefix(names: Iterable[str]) -> str | None:
    """The prefix in front of the VAE keys ('' for none), or None if there is no VAE."""
    marker = "decoder.conv_in.weight"
    prefixes = {n[: -len(marker)] for n in names if n.endswith(marker)}
    prefixes = sorted((p for p in prefixes if p == "" or p.endswith(".")), key=len)
    return prefixes[0] if prefixes else None


def _sample(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in sorted(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _not_a_vae_message(name: str, keys: list[str]) -> str:
    joined = " ".join(keys[:2000])
    transformer_marks = ("double_blocks.", "single_blocks.", "transformer_blocks.", "img_in.", "x_embedder.",
                         "input_blocks.", "joint_blocks.", "diffusion_model.")
    if any(mark in joined for mark in transformer_marks):
        return (
            f"{name} is a diffusion model (transformer), not a VAE. Load it with the FLUX.2 model loader, "
            f"and choose the VAE file here. {_GET_FLUX2_VAE}"
        )
    if any(mark in joined for mark in ("layers.0.self_attn.", "embed_tokens.", "text_model.", "encoder.block.0.")):
        return f"{name} is a text encoder, not a VAE. Load it with the text-encoder loader. {_GET_FLUX2_VAE}"
    return f"{name} is not a VAE this loader knows (it has no decoder.conv_in.weight). {_GET_FLUX2_VAE}"


def _check_is_flux2_vae(name: str, shapes: Mapping[str, tuple[int, ...]], all_keys: list[str]) -> None:
    """Refuse VAEs of other models with a message that says which model they belong to."""
    if "decoder.conv_in.weight" not in shapes:
        raise Flux2KitError(_not_a_vae_message(name, all_keys))
    conv_in = shapes["decoder.conv_in.weight"]
    if len(conv_in) == 5:
        raise Flux2KitError(f"{name} is a video VAE (3D convolutions, e.g. Wan or HunyuanVideo). {_GET_FLUX2_VAE}")
    if len(conv_in) != 4:
        raise Flux2KitError(
            f"{name} has a decoder.conv_in.weight of shape {conv_in}; it is not an image VAE. {_GET_FLUX2_VAE}"
        )
    channels = conv_in[1]
    if channels == 4:
        raise Flux2KitError(f"{name} is a Stable Diffusion 1.5/SDXL VAE (4 latent channels); {_GET_FLUX2_VAE}")
    if channels == 16:
        raise Flux2KitError(f"{name} is a FLUX.1/SD3 VAE (16 latent channels); {_GET_FLUX2_VAE}")
    if channels != FLUX2_LATENT_CHANNELS:
        raise Flux2KitError(f"{name} is a VAE with {channels} latent channels, not a FLUX.2 VAE; {_GET_FLUX2_VAE}")
    missing_bn = [k for k in ("bn.running_mean", "bn.running_var") if k not in shapes]
    if missing_bn:
        raise Flux2KitError(
            f"{name} has 32 latent channels but lacks the batch-norm statistics FLUX.2 latents are normalized "
            f"with ({', '.join(missing_bn)} missing). The file is incomplete or was saved by a tool that drops them; "
            f"{_GET_FLUX2_VAE}"
        )
    expected = (_PATCH * _PATCH * channels,)
    for key in ("bn.running_mean", "bn.running_var"):
        if tuple(shapes[key]) != expected:
            raise Flux2KitError(f"{name}: {key} has shape {tuple(shapes[key])}, expected {expected}. {_GET_FLUX2_VAE}")


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
        return 2 ** (len(self.model.config.block_out_channels) - 1) * _PATCH

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
        expected = _PATCH * _PATCH * self.model.config.latent_channels
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


def _assign(model: torch.nn.Module, name: str, tensor: Tensor) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer ``name`` without copying."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _build_on_meta(config: dict) -> AutoencoderKLFlux2:
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
        prefix = _vae_prefix(all_keys)
        if prefix is None:
            raise Flux2KitError(_not_a_vae_message(name, all_keys))
        if prefix == "":
            file_keys = all_keys
        else:  # an all-in-one checkpoint: other components live outside the prefix
            file_keys = [k for k in all_keys if k.startswith(prefix)]
        shapes = {k[len(prefix):]: tf.info(k).shape for k in file_keys}
        _check_is_flux2_vae(name, shapes, all_keys)

        is_ldm = any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in shapes)
        if is_ldm:
            rename, unknown = _ldm_rename_map(shapes)
            ldm_shapes = shapes
        else:
            rename = {k: k for k in shapes}
            to_ldm, unknown = _diffusers_rename_map(shapes)
            ldm_shapes = {to_ldm[k]: s for k, s in shapes.items() if k in to_ldm}
        if unknown:
            raise Flux2KitError(
                f"{name} has keys a FLUX.2 VAE does not have: {_sample(unknown)}. It is not a FLUX.2 VAE or it is "
                f"damaged. {_GET_FLUX2_VAE}"
            )
        _check_no_duplicates(rename)

        config = folder_config if folder_config is not None else vae_config_from_ldm(ldm_shapes)
        try:
            model = _build_on_meta(config)
        except (TypeError, ValueError) as e:
            raise Flux2KitError(f"{name}: cannot build a FLUX.2 VAE from its config ({e}). {_GET_FLUX2_VAE}") from None
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

        missing = [k for k in expected if k not in rename.values() and k not in _OPTIONAL_KEYS]
        extra = [k for k in rename.values() if k not in expected]
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"missing {_sample(missing)}")
            if extra:
                problems.append(f"unexpected {_sample(extra)}")
            raise Flux2KitError(
                f"{name} does not match the FLUX.2 VAE architecture ({'; '.join(problems)}). The file is damaged or "
                f"from another model. {_GET_FLUX2_VAE}"
            )
        for old, new in rename.items():
            file_shape = tuple(shapes[old])
            want = expected[new]
            if file_shape != want and not (_is_attn_projection(new) and file_shape == want + (1, 1)):
                raise Flux2KitError(
                    f"{name}: {prefix + old} has shape {file_shape}, expected {want}. The file is damaged or does not "
                    f"match its config.json. {_GET_FLUX2_VAE}"
                )

        # Stream: one tensor in memory at a time besides the model itself.
        for old, new in rename.items():
            t = tf.get(prefix + old)
            if _is_attn_projection(new) and t.ndim == 4:
                t = t[:, :, 0, 0]
            if t.is_floating_point():
                t = t.to(dtype)
            _assign(model, new, t.to(device).contiguous())
    if "bn.num_batches_tracked" not in rename.values():
        _assign(model, "bn.num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))

    model.eval().requires_grad_(False)
    return Flux2VAE(model, device, dtype)
