"""The FLUX.2 VAE's files: LDM single files (BFL / ComfyUI) and diffusers folders, names mapped both ways.

Two file layouts exist:
- BFL / ComfyUI single file (``flux2-vae.safetensors``): LDM names (``encoder.down.0.block.0...``,
  ``encoder.quant_conv``, ``decoder.post_quant_conv``, ``bn.running_mean``), attention
  projections stored as 1x1 convolutions, optionally under a prefix such as ``vae.``;
- diffusers folder (``vae/config.json`` + ``diffusion_pytorch_model.safetensors``).
The layout is read from the safetensors header, never from file names; VAEs of other models
(SD, SDXL, FLUX.1, video VAEs) are told apart by their shapes and refused with what to load instead.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from torch import Tensor

from ..errors import Flux2KitError

# BFL's flux2 AutoEncoder hard-codes these (src/flux2/autoencoder.py); nothing in a file says otherwise.
BATCH_NORM_EPS = 1e-4
NORM_NUM_GROUPS = 32
PATCH = 2
FLUX2_LATENT_CHANNELS = 32

GET_FLUX2_VAE = (
    "FLUX.2 needs its own VAE (flux2-vae.safetensors, 32 latent channels with batch-norm statistics): "
    "download it into ComfyUI/models/vae and select it."
)


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
OPTIONAL_KEYS = {"bn.num_batches_tracked"}  # bookkeeping only; some exports drop it

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


def is_attn_projection(diffusers_name: str) -> bool:
    """q/k/v/out weights: 1x1 conv (C, C, 1, 1) in LDM files, linear (C, C) in diffusers."""
    return ".attentions.0." in diffusers_name and diffusers_name.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    )


def ldm_rename_map(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
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


def diffusers_rename_map(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
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


def check_no_duplicates(mapping: Mapping[str, str]) -> None:
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
    prefix = vae_prefix(state_dict.keys())
    if prefix is None:
        raise Flux2KitError("These weights are not a VAE (no decoder.conv_in.weight). " + GET_FLUX2_VAE)
    names = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    mapping, unknown = ldm_rename_map(names)
    if unknown:
        raise Flux2KitError(f"Unexpected keys for a FLUX.2 VAE in LDM layout: {sample_names(unknown)}. " + GET_FLUX2_VAE)
    check_no_duplicates(mapping)
    out = {}
    for old, new in mapping.items():
        t = state_dict[prefix + old]
        out[new] = t[:, :, 0, 0] if is_attn_projection(new) and t.ndim == 4 else t
    return out


def convert_diffusers_vae_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``AutoencoderKLFlux2`` state dict -> LDM names as in BFL's ``flux2-vae.safetensors``
    (attention projections become 1x1 convolution weights)."""
    mapping, unknown = diffusers_rename_map(state_dict.keys())
    if unknown:
        raise Flux2KitError(f"Unexpected keys for a diffusers FLUX.2 VAE: {sample_names(unknown)}.")
    out = {}
    for old, new in mapping.items():
        t = state_dict[old]
        out[new] = t[:, :, None, None] if is_attn_projection(old) and t.ndim == 2 else t
    return out


def vae_config_from_ldm(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """``AutoencoderKLFlux2`` config inferred from the tensor shapes of an LDM-layout VAE (no prefix)."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise Flux2KitError(f"The VAE has no {name!r}: the file is incomplete. " + GET_FLUX2_VAE)
        return tuple(shapes[name])

    levels = _num_levels(shapes, r"encoder\.down\.(\d+)\.")
    up_levels = _num_levels(shapes, r"decoder\.up\.(\d+)\.")
    if levels == 0 or up_levels != levels:
        raise Flux2KitError(
            f"The VAE has {levels} encoder and {up_levels} decoder levels; a FLUX.2 VAE has the same number "
            "of each. The file is damaged or not a FLUX.2 VAE. " + GET_FLUX2_VAE
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
        "norm_num_groups": NORM_NUM_GROUPS,
        "use_quant_conv": has("encoder.quant_conv.weight", "quant_conv.weight"),
        "use_post_quant_conv": has("decoder.post_quant_conv.weight", "post_quant_conv.weight"),
        "mid_block_add_attention": has("encoder.mid.attn_1.q.weight"),
        "batch_norm_eps": BATCH_NORM_EPS,
        "batch_norm_momentum": 0.1,
        "patch_size": [PATCH, PATCH],
    }


# --------------------------------------------------------------------------------------------
# Telling a FLUX.2 VAE from everything else, from the header alone


def vae_prefix(names: Iterable[str]) -> str | None:
    """The prefix in front of the VAE keys ('' for none), or None if there is no VAE."""
    marker = "decoder.conv_in.weight"
    prefixes = {n[: -len(marker)] for n in names if n.endswith(marker)}
    prefixes = sorted((p for p in prefixes if p == "" or p.endswith(".")), key=len)
    return prefixes[0] if prefixes else None


def sample_names(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in sorted(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def not_a_vae_message(name: str, keys: list[str]) -> str:
    joined = " ".join(keys[:2000])
    transformer_marks = ("double_blocks.", "single_blocks.", "transformer_blocks.", "img_in.", "x_embedder.",
                         "input_blocks.", "joint_blocks.", "diffusion_model.")
    if any(mark in joined for mark in transformer_marks):
        return (
            f"{name} is a diffusion model (transformer), not a VAE. Load it with the FLUX.2 model loader, "
            f"and choose the VAE file here. {GET_FLUX2_VAE}"
        )
    if any(mark in joined for mark in ("layers.0.self_attn.", "embed_tokens.", "text_model.", "encoder.block.0.")):
        return f"{name} is a text encoder, not a VAE. Load it with the text-encoder loader. {GET_FLUX2_VAE}"
    return f"{name} is not a VAE this loader knows (it has no decoder.conv_in.weight). {GET_FLUX2_VAE}"


def check_is_flux2_vae(name: str, shapes: Mapping[str, tuple[int, ...]], all_keys: list[str]) -> None:
    """Refuse VAEs of other models with a message that says which model they belong to."""
    if "decoder.conv_in.weight" not in shapes:
        raise Flux2KitError(not_a_vae_message(name, all_keys))
    conv_in = shapes["decoder.conv_in.weight"]
    if len(conv_in) == 5:
        raise Flux2KitError(f"{name} is a video VAE (3D convolutions, e.g. Wan or HunyuanVideo). {GET_FLUX2_VAE}")
    if len(conv_in) != 4:
        raise Flux2KitError(
            f"{name} has a decoder.conv_in.weight of shape {conv_in}; it is not an image VAE. {GET_FLUX2_VAE}"
        )
    channels = conv_in[1]
    if channels == 4:
        raise Flux2KitError(f"{name} is a Stable Diffusion 1.5/SDXL VAE (4 latent channels); {GET_FLUX2_VAE}")
    if channels == 16:
        raise Flux2KitError(f"{name} is a FLUX.1/SD3 VAE (16 latent channels); {GET_FLUX2_VAE}")
    if channels != FLUX2_LATENT_CHANNELS:
        raise Flux2KitError(f"{name} is a VAE with {channels} latent channels, not a FLUX.2 VAE; {GET_FLUX2_VAE}")
    missing_bn = [k for k in ("bn.running_mean", "bn.running_var") if k not in shapes]
    if missing_bn:
        raise Flux2KitError(
            f"{name} has 32 latent channels but lacks the batch-norm statistics FLUX.2 latents are normalized "
            f"with ({', '.join(missing_bn)} missing). The file is incomplete or was saved by a tool that drops them; "
            f"{GET_FLUX2_VAE}"
        )
    expected = (PATCH * PATCH * channels,)
    for key in ("bn.running_mean", "bn.running_var"):
        if tuple(shapes[key]) != expected:
            raise Flux2KitError(f"{name}: {key} has shape {tuple(shapes[key])}, expected {expected}. {GET_FLUX2_VAE}")
