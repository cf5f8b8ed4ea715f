"""Load a FLUX.2 transformer from any supported checkpoint layout into diffusers' ``Flux2Transformer2DModel``.

The model is built on the meta device and filled one tensor at a time straight from the safetensors
file, so no second copy of the weights is ever held. FP8 layers become ``FP8Linear`` modules that
keep their FP8 weights and scales; everything else is stored in the compute dtype.
"""

from __future__ import annotations

import gc
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from diffusers import Flux2Transformer2DModel
from torch import nn

from ..devices import default_device, default_dtype
from ..errors import Flux2KitError, forget_locals
from ..parameters import KLEIN_MODES
from ..files.fp8 import read_fp8_layer
from ..files.gguf import packed_layers
from ..files.quantize import quantized_transformer_checkpoint
from ..files.transformer_checkpoint import (
    Target,
    TransformerCheckpoint,
    apply_op,
    inspect_transformer,
    map_bfl_key,
    map_diffusers_key,
    resolve_klein_mode,
    resolve_reference_kv,
)
from .fp8_linear import WEIGHT_MODES, FP8Linear
from .gguf_linear import gguf_module_for
from .meta import assign, missing_tensors, set_module
from .offload import BlockOffload

log = logging.getLogger("flux2kit")

_FUSED_QKV = {"img_attn.qkv": "attn.to_qkv", "txt_attn.qkv": "attn.to_added_qkv"}


@dataclass
class Flux2Transformer:
    """A loaded FLUX.2 transformer and what is known about it."""

    model: Flux2Transformer2DModel
    checkpoint: str  # human-readable description of the file it came from
    source: str
    variant: str
    quantization: str
    device: torch.device
    dtype: torch.dtype
    offload: BlockOffload | None = None
    distilled: bool | None = None  # [klein]: True = distilled (no guidance), False = base (CFG); [dev]: None
    reference_kv: bool = False  # FLUX.2 [klein] 9B KV: references attend only to themselves (their K/V cacheable)
    # Results computed from the weights (e.g. cached reference K/V), keyed with cache_key(); dropped when it moves.
    caches: dict = field(default_factory=dict, repr=False)

    def cache_key(self) -> tuple:
        """What identifies the weights for caches of computed results. Whatever changes the weights in place
        (LoRA adapters and their strengths) must change this key."""
        return (id(self.model), str(self.device), str(self.dtype))

    @property
    def family(self) -> str:
        """"dev" (embedded guidance) or "klein" (none: distilled, or base with classifier-free guidance)."""
        return "dev" if self.guidance_embeds else "klein"

    @property
    def uses_cfg(self) -> bool:
        """[klein] base runs classifier-free guidance against the empty prompt."""
        return self.family == "klein" and self.distilled is False

    @property
    def name(self) -> str:
        """For messages: "FLUX.2 [dev]", "FLUX.2 [klein] 4B distilled", ..."""
        size = {"klein-4b": " 4B", "klein-9b": " 9B"}.get(self.variant, "")
        mode = "" if self.distilled is None else (" distilled" if self.distilled else " base")
        mode = " KV" if self.reference_kv else mode
        return f"FLUX.2 [{self.family}]{size}{mode}"

    def __repr__(self) -> str:  # short: ComfyUI puts node inputs' reprs into its error reports
        return f"Flux2Transformer({self.checkpoint}, device={self.device}, dtype={self.dtype})"

    @property
    def config(self):
        return self.model.config

    @property
    def text_width(self) -> int:
        return int(self.model.config.joint_attention_dim)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.model.config.guidance_embeds)

    def __call__(self, latents, latent_ids, text, text_ids, sigma, guidance) -> torch.Tensor:
        """Predicted velocity for ``latents`` (B, N, 128); sigma and guidance are (B,) on a 0-1 / raw scale."""
        return self.model(
            hidden_states=latents,
            encoder_hidden_states=text,
            timestep=sigma,
            img_ids=latent_ids,
            txt_ids=text_ids,
            guidance=guidance,
            return_dict=False,
        )[0]

    def to(self, device: str | torch.device) -> "Flux2Transformer":
        """Move to ``device``; with block offload only the non-block layers move (blocks visit per call)."""
        device = torch.device(device)
        if device != self.device:
            self.caches.clear()  # computed on the old device: free that memory with the weights
        if self.offload is None:
            self.model.to(device)
        else:
            blocks = {id(m) for b in (self.model.transformer_blocks, self.model.single_transformer_blocks) for m in b}
            for child in self.model.children():
                if isinstance(child, nn.ModuleList) and all(id(m) in blocks for m in child):
                    continue
                child.to(device)
            self.offload.device = device
        self.device = device
        return self

    def release(self) -> None:
        """Drop the weights (the object stays, unusable)."""
        self.caches.clear()
        self.model = None  # type: ignore[assignment]
        gc.collect()


def _source_layer(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _targets(ckpt: TransformerCheckpoint, name: str) -> list[Target]:
    if ckpt.layout == "diffusers":
        return map_diffusers_key(name)
    module, param = _source_layer(name)
    for suffix, fused in _FUSED_QKV.items():
        if module.startswith("double_blocks.") and module.endswith(suffix):
            idx = module.split(".")[1]
            return [Target(f"transformer_blocks.{idx}.{fused}", param)]
    return map_bfl_key(name)


def _fuse_double_block_qkv(model: Flux2Transformer2DModel) -> None:
    """Give double-block attention the fused q|k|v layers BFL files store (one matmul instead of three)."""
    for block in model.transformer_blocks:
        attn = block.attn
        inner, dim = attn.to_q.out_features, attn.to_q.in_features
        attn.to_qkv = nn.Linear(dim, 3 * inner, bias=False, device="meta")
        attn.to_added_qkv = nn.Linear(attn.add_q_proj.in_features, 3 * inner, bias=False, device="meta")
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            delattr(attn, name)
        attn.fused_projections = True


def _layer_groups(ckpt: TransformerCheckpoint) -> dict[str, dict[str, str]]:
    """source layer -> {param: full key}, for keys under the checkpoint's prefix."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for key in ckpt.files.keys():
        if not key.startswith(ckpt.prefix):
            continue
        module, param = _source_layer(key[len(ckpt.prefix):])
        if param == "scaled_fp8" or key.endswith("scaled_fp8"):  # legacy format marker, no weight
            continue
        groups[module][param] = key
    return groups


def _quantized_targets(ckpt: TransformerCheckpoint, groups) -> dict[str, tuple]:
    """diffusers module path -> (LayerQuant, fp8 weight shape) for every FP8 layer."""
    out = {}
    for layer, q in ckpt.layers.items():
        params = groups.get(layer, {})
        if "weight" not in params:
            continue
        shape = ckpt.files.info(params["weight"]).shape
        for t in _targets(ckpt, f"{layer}.weight"):
            rows = shape[0] // t.op[2] if t.op and t.op[0] == "chunk" else shape[0]
            out[t.module] = (q, (rows, shape[1]))
    return out


def _swap_in_gguf_layers(model, ckpt: TransformerCheckpoint, groups, *, dtype) -> set[str]:
    """GGUF weights stored packed become GGUFLinear modules; returns their source layer names."""
    swapped = set()
    for layer, ggml_type in packed_layers(ckpt.files, ckpt.prefix).items():
        if "weight" not in groups.get(layer, {}):
            continue
        targets = _targets(ckpt, f"{layer}.weight")
        twins = [(t.module, gguf_module_for(model.get_submodule(t.module), ggml_type, compute_dtype=dtype))
                 for t in targets]
        if targets and all(twin is not None for _, twin in twins):
            for module_path, twin in twins:
                set_module(model, module_path, twin)
            swapped.add(layer)
    return swapped


def _load_weights(model, ckpt: TransformerCheckpoint, *, dtype, weights: str, place, packed=frozenset()) -> None:
    groups = _layer_groups(ckpt)
    unknown: list[str] = []
    for layer, params in groups.items():
        q = ckpt.layers.get(layer)
        side = ("comfy_quant", "weight", "weight_scale", "scale_weight", "scale_input", "input_scale") if q else ("comfy_quant",)
        # GGUF layers kept packed read the file's bytes (views of its memory map), not floats.
        read = lambda p, k: ckpt.files.packed(k) if p == "weight" and layer in packed else ckpt.files.get(k)  # noqa: E731
        tensors = {p: read(p, k) for p, k in params.items() if p not in side}
        if q is not None:
            w, scale = read_fp8_layer(ckpt.files, ckpt.prefix + layer, q)
            if weights == "dequantize":
                tensors["weight"] = (w.float() * (scale[:, None] if q.per_row else scale)).to(dtype)
            else:
                tensors["weight"], tensors["weight_scale"] = w, scale
                if q.has_input_scale:
                    tensors["input_scale"] = ckpt.files.get(params["input_scale"]).float().reshape(())
        for param, value in tensors.items():
            targets = _targets(ckpt, f"{layer}.{param}")
            if not targets:
                unknown.append(f"{layer}.{param}")
                continue
            for t in targets:
                part = apply_op(value, t.op)
                if part.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8) and t.param not in (
                        "weight_scale", "input_scale"):
                    part = part.to(dtype)
                try:
                    assign(model, f"{t.module}.{t.param}", place(t.module, part.contiguous()))
                except (AttributeError, KeyError):
                    unknown.append(f"{layer}.{param}")
        del tensors
    if unknown:
        log.warning("%s: ignored %d tensors with no place in the model, e.g. %s",
                    ckpt.files.name, len(unknown), ", ".join(unknown[:3]))
    missing = missing_tensors(model)
    if missing:
        raise Flux2KitError(
            f"{ckpt.files.name} is incomplete: {len(missing)} tensors are missing (e.g. {missing[0]}). "
            "The file may be damaged or a partial download; download it again."
        )


def load_transformer(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    weights: str = "as_stored",
    offload_blocks: bool = False,
    klein_mode: str = "auto",
) -> Flux2Transformer:
    """Load a FLUX.2 transformer (BFL / ComfyUI / diffusers layout, bf16 or FP8, or a GGUF file).

    ``weights="as_stored"`` keeps FP8 layers FP8 and GGUF weights packed in memory (dequantized per call
    into ``dtype``: fp32, bf16 or fp16); ``"dequantize"`` expands them to ``dtype`` at load.
    ``offload_blocks`` keeps the transformer blocks on the CPU and moves each to ``device`` only while
    it runs (the 32B model on a 24 GB card). ``klein_mode`` ("auto", "distilled", "base", "kv") says which
    [klein] model a file holds when the file itself does not ("auto" then raises); [dev] ignores it.
    """
    if weights not in WEIGHT_MODES:
        raise Flux2KitError(f"Unknown weight mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}.")
    if klein_mode not in KLEIN_MODES:
        raise Flux2KitError(f"Unknown klein_mode {klein_mode!r}; use one of {', '.join(KLEIN_MODES)}.")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    ckpt = inspect_transformer(path)
    try:
        distilled = resolve_klein_mode(ckpt, klein_mode)
    except BaseException:
        ckpt.files.close()
        raise
    if weights == "quantize":  # the ComfyUI FP8 file save_fp8_transformer would write, read lazily
        ckpt, weights = quantized_transformer_checkpoint(ckpt), "as_stored"
    model = None
    try:
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**ckpt.config)
        if ckpt.layout == "bfl":
            _fuse_double_block_qkv(model)
        groups = _layer_groups(ckpt)
        if weights == "as_stored":
            for module_path, (q, (rows, cols)) in _quantized_targets(ckpt, groups).items():
                set_module(model, module_path, FP8Linear(
                    cols, rows, bias=False, weight_dtype=q.dtype, per_row=q.per_row,
                    has_input_scale=q.has_input_scale, compute_dtype=dtype, device="meta"))
        packed = _swap_in_gguf_layers(model, ckpt, groups, dtype=dtype) if weights == "as_stored" else set()
        storage = torch.device("cpu")

        def place(module_path: str, t: torch.Tensor) -> torch.Tensor:
            in_blocks = module_path.startswith(("transformer_blocks.", "single_transformer_blocks."))
            return t.to(storage if (offload_blocks and in_blocks) else device)

        _load_weights(model, ckpt, dtype=dtype, weights=weights, place=place, packed=packed)
        model.eval().requires_grad_(False)
        offload = None
        if offload_blocks:
            offload = BlockOffload(list(model.transformer_blocks) + list(model.single_transformer_blocks),
                                   device=device, storage=storage)
        description = ckpt.description
        reference_kv = resolve_reference_kv(ckpt, klein_mode)
        if reference_kv:
            description += ", KV (references cached)"
        elif distilled is not None:
            description += ", distilled" if distilled else ", base (classifier-free guidance)"
        return Flux2Transformer(
            model=model, checkpoint=description, source=os.fspath(path), variant=ckpt.variant,
            quantization=ckpt.quantization if weights == "as_stored" else "none", device=device, dtype=dtype,
            offload=offload, distilled=distilled, reference_kv=reference_kv)
    except BaseException as exc:
        # Nothing half-loaded stays in memory after a failure, not even through the traceback.
        del model
        forget_locals(exc)
        gc.collect()
        raise
    finally:
        ckpt.files.close()
