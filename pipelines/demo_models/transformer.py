"""A tiny random FLUX.2 [dev]- or [klein]-architecture transformer, saved in every checkpoint layout we load.

Weights are rounded to bf16 once, so the bf16 files hold them exactly; FP8 layouts store the same
quantized block weights (one per-tensor scale per layer), so every FP8 layout describes the same
model, and ``fp8_reference`` gives that model with dequantized weights for parity checks.
"""

from __future__ import annotations

import json
import os
import re

import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import save_file

from ..files.fp8 import dequantize_weight, quantize_weight

LAYOUTS = ("bfl", "bfl-noprefix", "bfl-fp8r", "comfy-fp8", "comfy-fp8-header", "comfy-scaled-fp8", "diffusers",
           "diffusers-file")
FP8_LAYOUTS = ("bfl-fp8r", "comfy-fp8", "comfy-fp8-header", "comfy-scaled-fp8")
COMFY_PREFIX = "model.diffusion_model."


def tiny_transformer_config(**overrides) -> dict:
    """2 double + 2 single blocks, 2 heads x 128 (ComfyUI infers heads as width / 128), text width 384."""
    cfg = dict(patch_size=1, in_channels=128, out_channels=None, num_layers=2, num_single_layers=2,
               attention_head_dim=128, num_attention_heads=2, joint_attention_dim=384,
               timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
               eps=1e-6, guidance_embeds=True)
    cfg.update(overrides)
    return cfg


# Tiny [klein] text widths: 3 x the hidden size of the tiny Qwen3 encoders that feed them
# (pipelines/tiny/qwen3.py), standing in for Qwen3-4B (7680) and Qwen3-8B (12288).
KLEIN_TEXT_WIDTHS = {"4b": 192, "9b": 288}


def tiny_klein_config(size: str = "4b", **overrides) -> dict:
    """A tiny [klein]-like config: no guidance embedding; the text width of the tiny Qwen3 for ``size``."""
    return tiny_transformer_config(**{"guidance_embeds": False, "joint_attention_dim": KLEIN_TEXT_WIDTHS[size],
                                      **overrides})


def build_tiny_klein(seed: int = 0, size: str = "4b", **overrides) -> Flux2Transformer2DModel:
    """A random tiny [klein]-architecture transformer (``tiny_klein_config``)."""
    return build_tiny_transformer(seed, **tiny_klein_config(size, **overrides))


def build_tiny_transformer(seed: int = 0, **overrides) -> Flux2Transformer2DModel:
    """Random weights (norm scales too), rounded to bf16 so every file format stores them exactly."""
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**tiny_transformer_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
    return model.eval()


# -- diffusers -> BFL names (the inverse of checkpoint_formats.map_bfl_key) -----------------------

_INVERSE_SIMPLE = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_INVERSE_DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
_INVERSE_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
                   "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers state dict in BFL names: fused qkv, shift|scale order, norm weights called scale."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        module, _, param = key.rpartition(".")
        norm = "norm" in module.rsplit(".", 1)[-1]
        bparam = "scale" if norm and param == "weight" else param
        if module in _INVERSE_SIMPLE:
            if module == "norm_out.linear":
                scale, shift = t.chunk(2, dim=0)
                t = torch.cat([shift, scale], dim=0)
            out[f"{_INVERSE_SIMPLE[module]}.{bparam}"] = t
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", module)
        if m:
            i, inner = m.groups()
            if inner in ("attn.to_q", "attn.add_q_proj"):
                stream = "img" if inner == "attn.to_q" else "txt"
                names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
                parts = [sd[f"transformer_blocks.{i}.attn.{n}.{param}"] for n in names]
                out[f"double_blocks.{i}.{stream}_attn.qkv.{param}"] = torch.cat(parts, dim=0)
            elif inner in _INVERSE_DOUBLE:
                out[f"double_blocks.{i}.{_INVERSE_DOUBLE[inner]}.{bparam}"] = t
            continue
        m = re.match(r"single_transformer_blocks\.(\d+)\.(.+)$", module)
        if m:
            i, inner = m.groups()
            out[f"single_blocks.{i}.{_INVERSE_SINGLE[inner]}.{bparam}"] = t
    return out


def _is_quantized_layer(bfl_key: str) -> bool:
    """Which layers the FP8 files quantize: the block linears, as ComfyUI's fp8mixed files do."""
    return bfl_key.startswith(("double_blocks.", "single_blocks.")) and bfl_key.endswith(".weight") and \
        "norm" not in bfl_key


def _quantized(bfl: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k[: -len(".weight")]: quantize_weight(v.float()) for k, v in bfl.items() if _is_quantized_layer(k)}


def save_transformer(model: Flux2Transformer2DModel, path: str, layout: str, *,
                     is_distilled: bool | None = None) -> str:
    """Write ``model`` at ``path`` in one of ``LAYOUTS``; returns the path to give the loader.

    ``is_distilled`` (for [klein]) is recorded where real files record it: a diffusers folder's
    ``model_index.json`` (as ``Flux2KleinPipeline.save_pretrained`` writes it), or ``is_distilled``
    in a single file's safetensors metadata. None records nothing.
    """
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    flag = {} if is_distilled is None else {"is_distilled": "true" if is_distilled else "false"}
    if layout == "diffusers":
        os.makedirs(path, exist_ok=True)
        model.to(torch.bfloat16).save_pretrained(os.path.join(path, "transformer"), safe_serialization=True)
        model.float()
        if is_distilled is not None:
            index = {"_class_name": "Flux2KleinPipeline", "is_distilled": bool(is_distilled),
                     "transformer": ["diffusers", "Flux2Transformer2DModel"]}
            with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        return path
    if layout == "diffusers-file":
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, path, metadata=flag or None)
        return path
    bfl = to_bfl(sd)
    out: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = dict(flag)
    quant = _quantized(bfl) if layout in FP8_LAYOUTS else {}
    for key, t in bfl.items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer in quant:
            w, scale = quant[layer]
            out[f"{layer}.weight"] = w
            if layout == "bfl-fp8r":  # per-row scales, here all equal to the layer's scale
                out[f"{layer}.weight_scale"] = scale.expand(w.shape[0]).clone()
            elif layout == "comfy-scaled-fp8":
                out[f"{layer}.scale_weight"] = scale.reshape(1).clone()
                out[f"{layer}.scale_input"] = torch.ones(1)
            else:
                out[f"{layer}.weight_scale"] = scale.clone()
                if layout == "comfy-fp8":
                    conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                    out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            out[key] = t.to(torch.bfloat16)
    if layout == "comfy-scaled-fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    prefix = "" if layout in ("bfl-noprefix", "bfl-fp8r") else COMFY_PREFIX
    if layout == "comfy-fp8-header":
        layers = {prefix + layer: {"format": "float8_e4m3fn"} for layer in quant}
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    save_file({prefix + k: v.contiguous() for k, v in out.items()}, path, metadata=metadata or None)
    return path


def fp8_reference(model: Flux2Transformer2DModel) -> Flux2Transformer2DModel:
    """The model the FP8 files describe: block weights replaced by their dequantized FP8 values (fp32)."""
    import copy

    ref = copy.deepcopy(model).float()
    bfl = to_bfl({k: v.detach().float() for k, v in ref.state_dict().items()})
    deq = {layer: dequantize_weight(w, s, torch.float32) for layer, (w, s) in _quantized(bfl).items()}
    sd = ref.state_dict()
    for key in list(sd):
        module, _, param = key.rpartition(".")
        if param != "weight":
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.attn\.(to_[qkv]|add_[qkv]_proj)$", module)
        if m:
            i, name = m.groups()
            stream = "img" if name.startswith("to_") else "txt"
            idx = "qkv".index(name[-1] if stream == "img" else name[4])
            sd[key] = deq[f"double_blocks.{i}.{stream}_attn.qkv"].chunk(3, dim=0)[idx]
            continue
        bkey = next(iter(to_bfl({key: sd[key]})), None)
        if bkey and bkey[: -len(".weight")] in deq:
            sd[key] = deq[bkey[: -len(".weight")]]
    ref.load_state_dict(sd)
    return ref
