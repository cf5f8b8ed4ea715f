"""Tiny random LoRAs for the tiny FLUX.2 transformers, written in every LoRA file format flux2kit reads.

One LoRA (a dict BFL layer name -> (A, B), A (rank, in), B (out, rank)) is written in each format with
the same numbers, so every format describes the same deltas: ``deltas`` gives them in BFL row order
(the reference a test merges into the BFL weights).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

LORA_FORMATS = ("bfl", "bfl-downup", "bfl-noprefix", "bfl-base-model", "kohya", "diffusers", "lycoris")
_SPLIT = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_DOUBLE = {"img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
           "txt_attn.proj": "attn.to_add_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
        "single_stream_modulation.lin": "single_stream_modulation.linear",
        "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """BFL linear layer name -> (out, in) for a Flux2Transformer2DModel config."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(h * config["mlp_ratio"])
    shapes = {"img_in": (h, config["in_channels"]), "txt_in": (h, config["joint_attention_dim"]),
              "time_in.in_layer": (h, config["timestep_guidance_channels"]), "time_in.out_layer": (h, h),
              "double_stream_modulation_img.lin": (6 * h, h), "double_stream_modulation_txt.lin": (6 * h, h),
              "single_stream_modulation.lin": (3 * h, h),
              "final_layer.linear": (config.get("out_channels") or config["in_channels"], h),
              "final_layer.adaLN_modulation.1": (2 * h, h)}
    if config.get("guidance_embeds"):
        shapes.update({"guidance_in.in_layer": (h, config["timestep_guidance_channels"]), "guidance_in.out_layer": (h, h)})
    for i in range(config["num_layers"]):
        for s in ("img", "txt"):
            shapes.update({f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h), f"double_blocks.{i}.{s}_attn.proj": (h, h),
                           f"double_blocks.{i}.{s}_mlp.0": (2 * mlp, h), f"double_blocks.{i}.{s}_mlp.2": (h, mlp)})
    for i in range(config["num_single_layers"]):
        shapes.update({f"single_blocks.{i}.linear1": (3 * h + 2 * mlp, h), f"single_blocks.{i}.linear2": (h, h + mlp)})
    return shapes


def random_lora(config: dict, *, rank: int = 4, seed: int = 0, layers=None, std: float = 0.05):
    """{BFL layer: (A, B)} with random (non-zero) A and B for every linear (or ``layers``), rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in layer_shapes(config).items():
        if layers is not None and name not in layers:
            continue
        a = (torch.randn(rank, i, generator=g) * std).to(torch.bfloat16).float()
        b = (torch.randn(o, rank, generator=g) * std).to(torch.bfloat16).float()
        out[name] = (a, b)
    return out


def deltas(lora: dict, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """BFL layer -> the delta weight it adds (alpha / rank x B @ A), in BFL row order."""
    return {n: (1.0 if alpha is None else alpha / a.shape[0]) * (b @ a) for n, (a, b) in lora.items()}


def _diffusers_parts(name: str, a: torch.Tensor, b: torch.Tensor):
    """(diffusers module, A, B) pieces of one BFL layer: q|k|v split (A shared), adaLN rows swapped."""
    head, _, tail = name.partition(".")
    if name.startswith("double_blocks."):
        idx, inner = tail.split(".", 1)
        base = f"transformer_blocks.{idx}."
        if inner in _SPLIT:
            return [(base + m, a, part) for m, part in zip(_SPLIT[inner], b.chunk(3, dim=0))]
        return [(base + _DOUBLE[inner], a, b)]
    if name.startswith("single_blocks."):
        idx, inner = tail.split(".", 1)
        return [(f"single_transformer_blocks.{idx}.{_SINGLE[inner]}", a, b)]
    if name == "final_layer.adaLN_modulation.1":  # BFL shift|scale -> diffusers scale|shift
        shift, scale = b.chunk(2, dim=0)
        b = torch.cat([scale, shift], dim=0)
    return [(_TOP[name], a, b)]


def lora_state_dict(lora: dict, fmt: str, *, alpha: float | None = None) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of ``lora`` written in format ``fmt`` (one of LORA_FORMATS)."""
    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name, (a, b) in lora.items():
        if fmt in ("bfl", "bfl-downup", "bfl-noprefix", "bfl-base-model"):
            prefix = {"bfl": "diffusion_model.", "bfl-downup": "diffusion_model.", "bfl-noprefix": "",
                      "bfl-base-model": "base_model.model."}[fmt]
            down, up = ("lora_down", "lora_up") if fmt == "bfl-downup" else ("lora_A", "lora_B")
            sd[f"{prefix}{name}.{down}.weight"], sd[f"{prefix}{name}.{up}.weight"] = a, b
            if alpha is not None:
                sd[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
        elif fmt == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = a, b
            if alpha is not None:
                sd[f"{stem}.alpha"] = torch.tensor(float(alpha))
        elif fmt in ("diffusers", "lycoris"):
            for module, pa, pb in _diffusers_parts(name, a, b):
                if fmt == "diffusers":
                    sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"] = pa, pb
                else:
                    stem = "lycoris_" + module.replace(".", "_")
                    sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = pa, pb
                    if alpha is not None:
                        sd[f"{stem}.alpha"] = torch.tensor(float(alpha))
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}; one of {LORA_FORMATS}")
    if fmt == "diffusers" and alpha is not None:  # the peft config diffusers' save_lora_adapter writes
        rank = next(iter(lora.values()))[0].shape[0]
        modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in sd})
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha,
                                                    "transformer.target_modules": modules})
    return {k: v.contiguous().clone() for k, v in sd.items()}, meta


def save_lora(lora: dict, path: str, fmt: str = "bfl", *, alpha: float | None = None,
              metadata: dict | None = None, dtype=torch.bfloat16) -> str:
    """Write ``lora`` as a .safetensors file in format ``fmt``; returns the path."""
    sd, meta = lora_state_dict(lora, fmt, alpha=alpha)
    sd = {k: (v.to(dtype) if v.ndim else v.float()) for k, v in sd.items()}
    save_file(sd, path, metadata={"format": "pt", **meta, **(metadata or {})})
    return path


def lokr_layer(shape: tuple[int, int], *, rank: int | None = 4, seed: int = 0, std: float = 0.1):
    """LoKr factors for one layer (out, in): w1 whole, w2 decomposed (rank) or whole (rank None).

    The factor sizes are peft's ``factorization`` of each dimension, so diffusers' converter accepts them.
    """
    g = torch.Generator().manual_seed(seed)
    (o1, o2), (i1, i2) = factorization(shape[0]), factorization(shape[1])
    factors = {"lokr_w1": torch.randn(o1, i1, generator=g) * std}
    if rank is None:
        factors["lokr_w2"] = torch.randn(o2, i2, generator=g) * std
    else:
        factors["lokr_w2_a"] = torch.randn(o2, rank, generator=g) * std
        factors["lokr_w2_b"] = torch.randn(rank, i2, generator=g) * std
    return {k: v.to(torch.bfloat16).float() for k, v in factors.items()}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m <= n: LyCORIS' and peft's rule (the same loop as peft's)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)
