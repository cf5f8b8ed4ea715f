"""Merge mode: a LoRA stack added into copies of the weights it changes (faster than a side branch at high rank).

For each adapted layer the weight is read as fp32 (FP8 layers dequantized), the deltas of every
merged LoRA are added (each relative to the base weight, as in the side branch), and the result is
stored like the original: bf16/fp32 layers cast to their dtype, FP8 layers re-quantized with a new
scale (``amax / fp8 max``, per row for per-row layers, as ComfyUI recalculates it). Rounding is to
nearest by default; ``rounding="stochastic"`` is ComfyUI's choice (unbiased, seeded per layer).
Measured on the tiny model (README, "LoRA"): nearest gives the smaller error, at every LoRA size,
because one stochastic rounding adds noise of about sqrt(delta x step) to every changed weight where
nearest is off by at most half a step.

GGUF layers (``GGUFLinear``) are refused: their weights stay packed GGUF blocks and are never
re-quantized (K-quants such as Q4_K have no quantizer here, and a dense copy of each changed layer
would take back the memory the GGUF file saves), so LoRAs run on them as a side branch only, which
gives the exact result. A GGUF file loaded with its weights expanded (``weights="dequantize"``) has
ordinary bf16/fp32 layers and merges like any other.

The base model's own tensors are never written: the merged copies belong to the LoRA'd variant and
are swapped into the modules only while it runs, so removing the LoRA restores the originals bit
for bit (they are the same tensor objects) and other variants of the base are unaffected. The cost
is memory: one copy of each merged layer per variant.
"""

from __future__ import annotations

import zlib
from collections import Counter

import torch
from torch import Tensor, nn

from ..errors import Flux2KitError
from ..files.fp8 import quantize_weight
from .fp8_linear import FP8Linear
from .gguf_linear import GGUFLinear

ROUNDINGS = ("nearest", "stochastic")


def dense_weight(module: nn.Module) -> Tensor:
    """A layer's weight as a new fp32 tensor (FP8 layers dequantized)."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight(torch.float32)
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.ndim == 2 and weight.is_floating_point():
        return weight.detach().to(torch.float32, copy=True)  # a copy even when already fp32
    raise Flux2KitError(f"{type(module).__name__} layers cannot be read as a dense weight: merge mode and DoRA "
                        "need one. Use the side-branch mode with plain LoRA/LoKr files on this model.")


def check_mergeable(bindings) -> None:
    """Merge mode needs layers it can rewrite: nn.Linear (any float dtype) or FP8Linear; never GGUF layers."""
    gguf = {b.module_path: b.module for b in bindings if isinstance(b.module, GGUFLinear)}
    if gguf:
        raise gguf_merge_error(gguf)
    for b in bindings:
        if not isinstance(b.module, (nn.Linear, FP8Linear)):
            raise Flux2KitError(
                f"Merge mode cannot rewrite {b.module_path} ({type(b.module).__name__}); it merges into bf16/fp32 "
                "and FP8 layers. Use the side-branch mode for this model.")


def gguf_merge_error(layers: dict[str, GGUFLinear]) -> Flux2KitError:
    """The refusal of merge mode on GGUF layers (``{module path: GGUFLinear}``): what they are, why, the fix."""
    counts = Counter(m.ggml_type.name for m in layers.values()).most_common()
    path = next(p for p, m in layers.items() if m.ggml_type.name == counts[0][0])  # an example of the main type
    mix = ", ".join(f"{name} x{n}" for name, n in counts)
    return Flux2KitError(
        f"Merge mode cannot add a LoRA into GGUF layers: {path} is a GGUFLinear holding packed GGUF {counts[0][0]} "
        f"blocks (the merged LoRAs change {len(layers)} GGUF layers: {mix}). GGUF weights stay packed and are never "
        "re-quantized (K-quants such as Q4_K cannot be), so on a GGUF transformer LoRAs run as a side branch only, "
        "which gives the exact result: choose mode 'side branch' on FLUX.2 Load LoRA, or leave out --lora-merge in "
        "flux2kit generate. Nothing was changed.")


def _merged(module: nn.Module, bindings, path: str, rounding: str) -> dict[str, Tensor]:
    """The new tensors of one module: {"weight": ...} (+ "weight_scale" for FP8)."""
    with torch.inference_mode(False), torch.no_grad():
        base = dense_weight(module)
        total = torch.zeros_like(base)
        for b in bindings:
            rows = slice(None) if b.dst is None else slice(b.dst[0], b.dst[1])
            total[rows] += b.weight_delta(base[rows]).to(base.device)
        merged = base.add_(total)
        del total
        if isinstance(module, FP8Linear):
            generator = None
            if rounding == "stochastic":
                # Seeded by the layer's name, as ComfyUI does (CRC-32): the same merge gives the same bits.
                generator = torch.Generator(merged.device).manual_seed(zlib.crc32(path.encode()))
            w, scale = quantize_weight(merged, per_row=module.weight_scale.ndim == 1, dtype=module.weight.dtype,
                                       generator=generator)
            return {"weight": w, "weight_scale": scale.reshape(module.weight_scale.shape)}
        return {"weight": nn.Parameter(merged.to(module.weight.dtype), requires_grad=False)}


class MergedWeights:
    """The merged copies of one variant's layers, made on first use, swapped in while the variant runs."""

    def __init__(self, bindings, *, rounding: str = "nearest"):
        if rounding not in ROUNDINGS:
            raise Flux2KitError(f"Unknown rounding {rounding!r}; use one of {', '.join(ROUNDINGS)}.")
        self.rounding = rounding
        self.by_module: dict[str, list] = {}
        for b in bindings:
            self.by_module.setdefault(b.module_path, []).append(b)
        self.tensors: dict[str, dict[str, Tensor]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.tensors.values() for t in d.values())

    def planned_bytes(self, model: nn.Module) -> int:
        """What the merged copies will take once made: the merged layers' own weights (and scales)."""
        total = 0
        for path in self.by_module:
            module = model.get_submodule(path)
            for name in ("weight", "weight_scale"):
                t = getattr(module, name, None)
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total

    def make(self, model: nn.Module) -> None:
        """Compute every merged copy now (otherwise on the first run)."""
        for path, bindings in self.by_module.items():
            if path not in self.tensors:
                self.tensors[path] = _merged(model.get_submodule(path), bindings, path, self.rounding)

    def swap_in(self, model: nn.Module):
        """Put the merged tensors into the modules; returns the function that puts the originals back."""
        if not self.by_module:
            return lambda: None
        self.make(model)
        self.follow(model)
        saved = []
        for path, tensors in self.tensors.items():
            module = model.get_submodule(path)
            for name, t in tensors.items():
                slot = module._parameters if name in module._parameters else module._buffers
                saved.append((slot, name, slot[name]))
                slot[name] = t

        def restore():
            for slot, name, original in reversed(saved):
                slot[name] = original

        return restore

    def follow(self, model: nn.Module) -> None:
        """Keep each copy on the device of the weight it replaces (after the base moved)."""
        for path, tensors in self.tensors.items():
            device = model.get_submodule(path).weight.device
            for name, t in list(tensors.items()):
                if t.device != device:
                    moved = t.to(device)
                    tensors[name] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved

    def release(self) -> None:
        self.tensors = {}
