"""FLUX.2 transformer checkpoints: which layout a file is in, how it is quantized, and how its names map
to diffusers' ``Flux2Transformer2DModel``.

Layouts seen in the wild (all detected from the safetensors header, never from file names):

- BFL single file (``double_blocks.N.img_attn.qkv`` ...), with or without ``model.diffusion_model.``;
  bf16, or FP8 with BFL's per-row ``weight_scale`` (``fp8r``).
- ComfyUI FP8 ("fp8mixed"): BFL names; quantized layers carry ``weight`` (fp8), ``weight_scale``
  (scalar), optional ``input_scale`` and a ``comfy_quant`` JSON tensor, or the header entry
  ``_quantization_metadata`` lists them. Untagged layers are bf16.
- ComfyUI legacy ``scaled_fp8``: a ``scaled_fp8`` marker plus ``scale_weight`` / ``scale_input``.
- diffusers folders (``transformer/config.json`` + ``diffusion_pytorch_model*.safetensors``) and
  diffusers-named single files.

Variants: [dev] has a guidance embedding, [klein] has none; the widths tell [dev], [klein] 4B and
[klein] 9B apart (other widths are "custom", [dev]-like or [klein]-like by the guidance embedding).
[klein] distilled and base have identical tensors, so which one a file holds is read only from what
the file says about itself (``is_distilled`` in the safetensors metadata, or in the
``model_index.json`` of a diffusers folder), never guessed; otherwise the loader's setting decides.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import Flux2KitError
from ..parameters import KLEIN_MODES
from .fp8 import LayerQuant, scan_quantization
from .gguf import GGUFFile, open_weights
from .safetensors import TensorFile, safetensors_files_in

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
_BFL_ANCHOR = "double_stream_modulation_img.lin.weight"
_DIFFUSERS_ANCHOR = "double_stream_modulation_img.linear.weight"

VARIANTS = {  # (inner dim, text width) -> variant, from the model family table
    (6144, 15360): "dev",
    (3072, 7680): "klein-4b",
    (4096, 12288): "klein-9b",
}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass
class TransformerCheckpoint:
    """Everything the header says about a transformer checkpoint; no weights loaded."""

    files: TensorFile
    layout: str  # "bfl" | "diffusers"
    quantization: str  # "none" | "comfy-fp8" | "comfy-scaled-fp8" | "bfl-fp8r" | "fp8-unscaled" | "gguf"
    prefix: str
    config: dict
    variant: str  # "dev" | "klein-4b" | "klein-9b" | "custom"
    layers: dict[str, LayerQuant] = field(default_factory=dict)  # source layer name -> storage
    source: str = ""
    distilled: bool | None = None  # [klein]: what the file says (None: it does not say)
    distilled_from: str = ""  # where ``distilled`` was read
    reference_kv: bool = False  # [klein] 9B KV, by its diffusers folder's pipeline class (Flux2KleinKVPipeline)

    @property
    def family(self) -> str:
        """"dev" (guidance embedding) or "klein" (none)."""
        return "dev" if self.config["guidance_embeds"] else "klein"

    @property
    def description(self) -> str:
        q = {"none": "bf16/fp32", "comfy-fp8": "ComfyUI FP8", "comfy-scaled-fp8": "ComfyUI scaled FP8 (legacy)",
             "bfl-fp8r": "BFL FP8 (per-row scales)", "fp8-unscaled": "FP8 (unscaled)", "gguf": "GGUF"}[self.quantization]
        if self.quantization == "gguf":  # the file's type mix, e.g. "GGUF Q4_K x412, Q6_K x40, BF16 x10, F32 x320"
            q += " " + ", ".join(f"{name} x{n}" for name, (n, _) in self.files.type_mix().items())
        c = self.config
        name = self.variant if self.variant != "custom" else f"custom, {self.family}-like"
        return (f"FLUX.2 [{name}] transformer, {self.layout} layout, {q}, "
                f"{c['num_layers']} double + {c['num_single_layers']} single blocks, "
                f"width {c['num_attention_heads'] * c['attention_head_dim']}")


# ----------------------------------------------------------------------------------------------
# Detection


def _foreign_model_error(name: str, keys: list[str]) -> Flux2KitError:
    joined = "\n".join(keys[:4000])
    hint = "Put a FLUX.2 transformer here (e.g. flux2_dev_fp8mixed.safetensors in models/diffusion_models)."
    if "joint_blocks." in joined:  # before FLUX.1: SD3 shares its x_embedder.proj name
        what = "a Stable Diffusion 3 checkpoint"
    elif "img_mod.lin.weight" in joined or "vector_in.in_layer" in joined or "x_embedder.proj" in joined:
        what = "a FLUX.1 checkpoint"
    elif "input_blocks." in joined or "conditioner.embedders" in joined or "down_blocks.0.attentions" in joined:
        what = "a Stable Diffusion / SDXL checkpoint"
    elif "decoder.conv_in" in joined or "decoder.up" in joined or "encoder.down" in joined:
        what = "a VAE"
        hint = "Load it with the VAE loader; the transformer slot needs a FLUX.2 diffusion model."
    elif "embed_tokens" in joined or ".self_attn.q_proj" in joined or "token_embd.weight" in joined or ".attn_q." in joined:
        what = "a text encoder"
        hint = "Load it with the text encoder loader; the transformer slot needs a FLUX.2 diffusion model."
    else:
        what = "not a FLUX.2 transformer"
        return Flux2KitError(f"{name} is {what}. {hint}")
    return Flux2KitError(f"{name} is {what}, not a FLUX.2 transformer. {hint}")


def _find_prefix(keys: list[str], anchor: str) -> str | None:
    for k in keys:
        if k.endswith(anchor):
            prefix = k[: -len(anchor)]
            if prefix == "" or prefix in _PREFIXES:
                return prefix
    return None


def _count_blocks(keys: list[str], pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


_CONFIG_KEYS = {  # layout -> where each config value can be read from tensor shapes
    "bfl": dict(x="img_in.weight", out="final_layer.linear.weight", txt="txt_in.weight",
                # ComfyUI's ModelSave writes the RMSNorm weights as .weight where BFL writes .scale
                head=("double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_attn.norm.query_norm.weight"),
                time="time_in.in_layer.weight",
                mlp="double_blocks.0.img_mlp.0.weight", guidance="guidance_in.in_layer.weight",
                double=r"double_blocks\.(\d+)\.", single=r"single_blocks\.(\d+)\."),
    "diffusers": dict(x="x_embedder.weight", out="proj_out.weight", txt="context_embedder.weight",
                      head="transformer_blocks.0.attn.norm_q.weight",
                      time="time_guidance_embed.timestep_embedder.linear_1.weight",
                      mlp="transformer_blocks.0.ff.linear_in.weight",
                      guidance="time_guidance_embed.guidance_embedder.linear_1.weight",
                      double=r"transformer_blocks\.(\d+)\.", single=r"single_transformer_blocks\.(\d+)\."),
}


def _config_from_shapes(files: TensorFile, prefix: str, layout: str) -> dict:
    """Flux2Transformer2DModel's config, read off the tensor shapes (no config file needed)."""
    names = _CONFIG_KEYS[layout]
    keys = [k[len(prefix):] for k in files.keys() if k.startswith(prefix)]
    present = set(keys)

    def shape(what: str):
        options = names[what] if isinstance(names[what], tuple) else (names[what],)
        name = next((n for n in options if n in present), None)
        if name is None:
            raise Flux2KitError(f"{files.name} looks like a FLUX.2 transformer but has no {options[0]} tensor: the file "
                                "is incomplete or from another model: download it again.")
        return files.info(prefix + name).shape

    inner, in_channels = shape("x")
    head_dim = shape("head")[0]
    return dict(
        patch_size=1,
        in_channels=in_channels,
        out_channels=shape("out")[0],
        num_layers=_count_blocks(keys, names["double"]),
        num_single_layers=_count_blocks(keys, names["single"]),
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=shape("txt")[1],
        timestep_guidance_channels=shape("time")[1],
        mlp_ratio=shape("mlp")[0] / 2 / inner,
        axes_dims_rope=(head_dim // 4,) * 4,
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=names["guidance"] in keys,
    )


def detect_variant(config: dict) -> str:
    """"dev", "klein-4b", "klein-9b" or "custom", from the widths and the guidance embedding."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    variant = VARIANTS.get((inner, config["joint_attention_dim"]), "custom")
    if (variant == "dev") != bool(config["guidance_embeds"]):
        return "custom"  # a known width with the other family's guidance input: not a released model
    return variant


def _parse_flag(value) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def read_distilled(path: str, files: TensorFile) -> tuple[bool | None, str]:
    """``(is_distilled, where it was read)`` from the file's own metadata, or ``(None, "")``.

    Looked for: ``is_distilled`` in the safetensors header metadata, and in a diffusers folder the
    pipeline's ``model_index.json`` (Flux2KleinPipeline registers ``is_distilled`` there).
    """
    value = files.metadata.get("is_distilled")
    if value is not None and _parse_flag(value) is not None:
        return _parse_flag(value), f"the safetensors metadata of {files.name}"
    raw, index = _model_index(path)
    if raw is not None and _parse_flag(raw.get("is_distilled")) is not None:
        return _parse_flag(raw["is_distilled"]), index
    return None, ""


KV_PIPELINE = "Flux2KleinKVPipeline"  # the pipeline class of black-forest-labs/FLUX.2-klein-9b-kv


def _model_index(path: str) -> tuple[dict | None, str]:
    """A diffusers folder's model_index.json (parsed) and its path, or (None, "")."""
    if not os.path.isdir(path):
        return None, ""
    root = path if os.path.isdir(os.path.join(path, "transformer")) else os.path.dirname(os.path.abspath(path))
    index = os.path.join(root, "model_index.json")
    try:
        with open(index, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None, ""
    return (raw, index) if isinstance(raw, dict) else (None, "")


def read_reference_kv(path: str) -> bool:
    """True for FLUX.2 [klein] 9B KV: its tensors are plain [klein] 9B's; only its pipeline class tells it apart."""
    raw, _ = _model_index(path)
    return bool(raw) and raw.get("_class_name") == KV_PIPELINE


def resolve_reference_kv(ckpt: "TransformerCheckpoint", klein_mode: str = "auto") -> bool:
    """Whether a [klein] checkpoint runs as the KV model: klein_mode "kv", or "auto" and the folder says so."""
    return ckpt.family == "klein" and (klein_mode == "kv" or (klein_mode == "auto" and ckpt.reference_kv))


def resolve_klein_mode(ckpt: "TransformerCheckpoint", klein_mode: str = "auto") -> bool | None:
    """Distilled (True) or base (False) for a [klein] checkpoint; None for [dev].

    The file's own metadata decides under "auto"; an explicit setting wins (with a warning when the
    file says otherwise). Unknown under "auto" is an error: the tensors are the same, so never guess.
    """
    if klein_mode not in KLEIN_MODES:
        raise Flux2KitError(f"Unknown klein_mode {klein_mode!r}; use one of {', '.join(KLEIN_MODES)}.")
    if ckpt.family != "klein":
        return None
    if klein_mode == "kv" or (klein_mode == "auto" and ckpt.reference_kv):
        return True  # the KV model is distilled (diffusers runs it without guidance)
    if klein_mode == "auto":
        if ckpt.distilled is None:
            raise Flux2KitError(
                f"{ckpt.files.name} is a FLUX.2 [klein] transformer, and its file does not say whether it is the "
                "distilled model (4 steps, no guidance) or the base model (about 50 steps, classifier-free guidance): "
                "their tensors are identical. Pick klein_mode 'distilled' or 'base' (or 'kv' for [klein] 9B KV) in the transformer loader "
                "(--klein-mode for flux2kit generate); files named ...klein-base... are base, the others distilled."
            )
        return ckpt.distilled
    wanted = klein_mode == "distilled"
    if ckpt.distilled is not None and ckpt.distilled != wanted:
        logging.getLogger("flux2kit").warning(
            "%s says it is the %s [klein] model (%s), but klein_mode is '%s': running it as %s, as set.",
            ckpt.files.name, "distilled" if ckpt.distilled else "base", ckpt.distilled_from, klein_mode, klein_mode,
        )
    return wanted


def _diffusers_folder_files(path: str) -> tuple[list[str], dict]:
    folder = path
    if os.path.isdir(os.path.join(path, "transformer")):
        folder = os.path.join(path, "transformer")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise Flux2KitError(
            f"{path} is a folder without a transformer config.json. Give a diffusers FLUX.2 folder "
            "(containing transformer/) or a single .safetensors checkpoint."
        )
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cls = cfg.get("_class_name", "")
    if cls and cls != "Flux2Transformer2DModel":
        raise Flux2KitError(
            f"{folder} holds a {cls}, not a FLUX.2 transformer (Flux2Transformer2DModel). "
            "Point the loader at a FLUX.2 model folder."
        )
    return safetensors_files_in(folder, "diffusion_pytorch_model"), cfg


def _detect_layout(files, path: str) -> tuple[str, str, dict]:
    """``(layout, prefix, config)`` from the tensor names and shapes (a GGUF's "flux" architecture field is
    written for FLUX.1 and FLUX.2 alike, so it is never read)."""
    keys = files.keys()
    prefix = _find_prefix(keys, _BFL_ANCHOR)
    if prefix is not None:
        return "bfl", prefix, _config_from_shapes(files, prefix, "bfl")
    prefix = _find_prefix(keys, _DIFFUSERS_ANCHOR)
    if prefix is None:
        raise _foreign_model_error(os.path.basename(path.rstrip("/")), keys)
    return "diffusers", prefix, _config_from_shapes(files, prefix, "diffusers")


def inspect_transformer(path: str | os.PathLike) -> TransformerCheckpoint:
    """Identify a FLUX.2 transformer checkpoint (file or diffusers folder) from its header alone."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise Flux2KitError(f"Transformer not found: {path}. Check the path or put the file in models/diffusion_models.")
    if os.path.isdir(path):
        paths, _ = _diffusers_folder_files(path)
        files = TensorFile.open(paths)
    else:
        files = open_weights(path)  # safetensors, or GGUF (told apart by the file's first bytes)
    try:
        layout, prefix, config = _detect_layout(files, path)
        if isinstance(files, GGUFFile):
            files.check_supported()
            quantization, layers = "gguf", {}
        else:
            quantization, layers = scan_quantization(files, prefix)
    except BaseException:
        files.close()
        raise
    variant = detect_variant(config)
    distilled, distilled_from = read_distilled(path, files) if not config["guidance_embeds"] else (None, "")
    return TransformerCheckpoint(files=files, layout=layout, quantization=quantization, prefix=prefix,
                                 config=config, variant=variant, layers=layers, source=path, distilled=distilled,
                                 distilled_from=distilled_from,
                                 reference_kv=not config["guidance_embeds"] and read_reference_kv(path))


# ----------------------------------------------------------------------------------------------
# Name mapping BFL -> diffusers (a pure function of the key; mirrors diffusers'
# convert_flux2_transformer_checkpoint_to_diffusers, streaming one tensor at a time)

_RENAME = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_DOUBLE = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}


def bfl_modules(config: dict) -> list[str]:
    """Every BFL module name of a transformer with ``config`` (without prefix), in file order."""
    modules = list(_RENAME)
    modules += [f"double_blocks.{i}.{m}" for i in range(config["num_layers"]) for m in (*_DOUBLE, *_QKV)]
    modules += [f"single_blocks.{i}.{m}" for i in range(config["num_single_layers"]) for m in _SINGLE]
    return modules


@dataclass(frozen=True)
class Target:
    """One diffusers tensor made from a source tensor: ``op`` is None, ("chunk", i, n) or ("swap",)."""

    module: str
    param: str
    op: tuple | None = None


def map_bfl_key(key: str) -> list[Target]:
    """Diffusers targets of one BFL tensor name (without prefix); [] for tensors with no model slot."""
    module, _, param = key.rpartition(".")
    if param == "scale":  # RMSNorm weights are called scale in BFL's code
        param = "weight"
    if param in ("scale_weight", "scale_input"):  # legacy scaled_fp8 names
        param = {"scale_weight": "weight_scale", "scale_input": "input_scale"}[param]
    if module in _RENAME:
        op = ("swap",) if module == "final_layer.adaLN_modulation.1" else None
        return [Target(_RENAME[module], param, op)]
    m = re.match(r"(double|single)_blocks\.(\d+)\.(.+)$", module)
    if m is None:
        return []
    kind, idx, inner = m.groups()
    if kind == "double":
        if inner in _QKV:
            return [Target(f"transformer_blocks.{idx}.{name}", param, ("chunk", i, 3))
                    for i, name in enumerate(_QKV[inner])]
        new = _DOUBLE.get(inner)
        return [Target(f"transformer_blocks.{idx}.{new}", param)] if new else []
    new = _SINGLE.get(inner)
    return [Target(f"single_transformer_blocks.{idx}.{new}", param)] if new else []


def map_diffusers_key(key: str) -> list[Target]:
    module, _, param = key.rpartition(".")
    return [Target(module, param)]


def apply_op(tensor: torch.Tensor, op: tuple | None) -> torch.Tensor:
    """Apply a mapping op; scalar scales are shared by every part of a split layer."""
    if op is None or tensor.numel() == 1:
        return tensor
    if op[0] == "chunk":
        return tensor.chunk(op[2], dim=0)[op[1]]
    if op[0] == "swap":  # BFL stores shift|scale, diffusers' AdaLayerNormContinuous wants scale|shift
        shift, scale = tensor.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)
    raise ValueError(f"unknown op {op}")
