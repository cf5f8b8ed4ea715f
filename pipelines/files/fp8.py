"""FP8 weights on disk: which layers a checkpoint stores as FP8, how they are scaled, and the numerics.

Formats read (all from the safetensors header and the small side tensors, never from file names):

- ComfyUI current: per layer ``weight`` (float8_e4m3fn or e5m2), ``weight_scale`` (fp32 scalar),
  optional ``input_scale``, and ``comfy_quant`` (uint8 JSON such as ``{"format": "float8_e4m3fn"}``),
  or the header entry ``_quantization_metadata`` listing the layers.
- ComfyUI legacy: a ``scaled_fp8`` marker tensor plus per-layer ``scale_weight`` / ``scale_input``.
- Black Forest Labs' "fp8r": one fp32 ``weight_scale`` per output row.
- Plain FP8 casts without a scale (scale 1).

Quantization formats flux2kit does not run (NVFP4, MXFP8, int8) are refused with a clear message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import Flux2KitError, UnsupportedFormatError

FP8_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# Per-layer tensors that describe a layer's storage rather than hold a weight.
SIDE_TENSORS = ("weight_scale", "input_scale", "scale_weight", "scale_input", "comfy_quant")
_SCALE_NAMES = ("weight_scale", "scale_weight")


def check_fp8(dtype) -> torch.dtype:
    """The torch FP8 dtype for a name or dtype; an error for any other format."""
    dtype = FP8_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in FP8_DTYPES.values():
        raise UnsupportedFormatError(
            f"FP8 format {dtype} is not supported; flux2kit runs float8_e4m3fn and float8_e5m2 "
            "weights. Use a checkpoint in one of those formats, or a bf16 one."
        )
    return dtype


def fp8_max(dtype) -> float:
    """Largest finite value of an FP8 dtype: 448 for e4m3fn, 57344 for e5m2."""
    return float(torch.finfo(check_fp8(dtype)).max)


def quantize_weight(w: Tensor, *, per_row: bool = False, dtype=torch.float8_e4m3fn,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Quantize a weight to FP8; returns ``(w_fp8, scale)`` with fp32 ``scale`` of shape
    ``()`` or, per row, ``(out_features,)``, so that ``w ~= w_fp8.float() * scale``.

    Rounding is to nearest (ties to even); with a ``generator``, stochastic (see ``stochastic_round``).
    """
    dtype = check_fp8(dtype)
    w = w.detach().float()
    amax = w.abs().amax(dim=1) if per_row else w.abs().amax()
    # An all-zero tensor or row would give scale 0 and 0/0 = NaN; any positive scale works.
    scale = torch.where(amax > 0, amax / fp8_max(dtype), torch.ones_like(amax))
    w_scaled = w / (scale[:, None] if per_row else scale)
    if generator is not None:
        return stochastic_round(w_scaled, dtype, generator), scale
    w_fp8 = w_scaled.clamp(-fp8_max(dtype), fp8_max(dtype)).to(dtype)
    return w_fp8, scale


_ROUND_CHUNK = 1 << 22  # elements per step: the random numbers of a big layer need not exist all at once


def stochastic_round(x: Tensor, dtype, generator: torch.Generator) -> Tensor:
    """``x`` (fp32, already in the FP8 range) rounded to ``dtype`` up or down at random, with probability
    proportional to closeness: unbiased (E[round(x)] = x), so a small added delta survives on average
    where round-to-nearest would drop it. Deterministic for a seeded ``generator``.

    torch has no stochastic FP8 cast, so it is built here from the nearest value and its neighbour one
    code away (FP8 codes of one sign are ordered by magnitude).
    """
    dtype = check_fp8(dtype)
    limit = fp8_max(dtype)
    flat, out = x.reshape(-1), torch.empty(x.numel(), dtype=dtype, device=x.device)
    for start in range(0, flat.numel(), _ROUND_CHUNK):
        v = flat[start:start + _ROUND_CHUNK].float().clamp(-limit, limit)
        near = v.to(dtype)
        nf = near.float()
        code = near.view(torch.uint8).to(torch.int16)
        magnitude = (code & 0x7F) + (v.abs() > nf.abs()).to(torch.int16) - (v.abs() < nf.abs()).to(torch.int16)
        sign = torch.where(v < 0, 0x80, 0).to(torch.int16)
        other = (sign | magnitude).to(torch.uint8)
        gap = (other.view(dtype).float() - nf).abs()
        p = torch.where(gap > 0, (v - nf).abs() / gap.clamp_min(1e-30), torch.zeros_like(v))
        u = torch.rand(v.shape, generator=generator, device=v.device)
        chosen = torch.where(u < p, other, near.view(torch.uint8))
        out.view(torch.uint8)[start:start + _ROUND_CHUNK] = chosen
    return out.reshape(x.shape)


def dequantize_weight(w_fp8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``w_fp8.float() * scale`` (per-row scales broadcast over rows), cast to ``dtype``.

    Multiplying in fp32 before the cast matches ComfyUI, so both give the same weights.
    """
    scale = scale.reshape(-1, 1) if scale.ndim == 1 else scale
    if w_fp8.device.type == "cpu" and w_fp8.dtype == torch.float8_e4m3fn:
        return (_e4m3_to_float_over_256(w_fp8).mul_(scale * 256.0)).to(dtype)
    return (w_fp8.to(torch.float32) * scale).to(dtype)


def _e4m3_to_float_over_256(w_fp8: Tensor) -> Tensor:
    """``w_fp8.float() / 256``, exactly, about 4x faster than torch's own fp8 cast on a CPU.

    An e4m3fn byte shifted into an fp16 bit pattern is the same number times 2^-8 (exponent bias 7
    vs 15, subnormals included), and fp16 -> fp32 is a fast exact cast; the factor 256 then goes
    into the scale, a power of two, so the product rounds exactly as ``w.float() * scale``. (The FP8
    NaN code would read as 480; quantized weights never hold it.)
    """
    bits = w_fp8.view(torch.int8).to(torch.int16).bitwise_left_shift_(7).bitwise_and_(~0x4000)
    return bits.view(torch.float16).float()


# ----------------------------------------------------------------------------------------------
# Which layers of a checkpoint are FP8


@dataclass(frozen=True)
class LayerQuant:
    """How one linear layer's weight is stored."""

    dtype: torch.dtype  # float8_e4m3fn or float8_e5m2
    per_row: bool  # BFL fp8r: one scale per output row
    has_scale: bool  # False for plain FP8 casts (scale 1.0)
    has_input_scale: bool


# What ComfyUI's own quantize-and-save writes: per-tensor e4m3fn with a scale.
COMFY_FP8 = LayerQuant(dtype=torch.float8_e4m3fn, per_row=False, has_scale=True, has_input_scale=False)


def _read_json_tensor(files, key: str) -> dict:
    raw = files.get(key)
    try:
        return json.loads(raw.numpy().tobytes())
    except (ValueError, UnicodeDecodeError):
        raise Flux2KitError(f"{files.name}: {key} is not valid JSON; the file is damaged.") from None


def _refuse_quant_format(name: str, fmt: str, layer: str) -> None:
    if fmt not in FP8_DTYPES:
        raise UnsupportedFormatError(
            f"{name} uses ComfyUI's '{fmt}' quantization (layer {layer}), which flux2kit does not support yet. "
            "Use the FP8 (fp8mixed / float8_e4m3fn) or bf16 file of this model."
        )


def scan_quantization(files, prefix: str) -> tuple[str, dict[str, LayerQuant]]:
    """``(scheme, {layer name without prefix: LayerQuant})`` for the FP8 layers of a checkpoint.

    ``scheme`` is "none", "comfy-fp8", "comfy-scaled-fp8", "bfl-fp8r" or "fp8-unscaled".
    """
    keys = set(files.keys())
    meta = files.metadata
    strip = (lambda k: k[len(prefix):] if k.startswith(prefix) else k)
    formats: dict[str, str] = {}
    scheme = None
    if "_quantization_metadata" in meta:
        try:
            layers = json.loads(meta["_quantization_metadata"]).get("layers", {})
        except (ValueError, AttributeError):
            raise Flux2KitError(f"{files.name}: _quantization_metadata is not valid JSON; the file is damaged.") from None
        formats = {strip(k): v.get("format", "") for k, v in layers.items()}
        scheme = "comfy-fp8"
    for k in keys:
        if k.endswith(".comfy_quant"):
            formats[strip(k[: -len(".comfy_quant")])] = _read_json_tensor(files, k).get("format", "")
            scheme = "comfy-fp8"
    legacy = any(k.endswith("scaled_fp8") for k in keys)
    if legacy and scheme is None:
        scheme = "comfy-scaled-fp8"
        for k in keys:
            if k.endswith(".scale_weight"):
                formats[strip(k[: -len(".scale_weight")])] = "float8_e4m3fn"
    if any(k.endswith(".weight_scale_2") for k in keys) and scheme is None:
        raise UnsupportedFormatError(
            f"{files.name} is an NVFP4 checkpoint, which flux2kit does not support yet. "
            "Use the FP8 (fp8mixed) or bf16 file of this model."
        )
    for layer, fmt in formats.items():
        _refuse_quant_format(files.name, fmt, layer)

    out: dict[str, LayerQuant] = {}
    for k, info in files.items_info():
        if not k.endswith(".weight") or k.endswith("scaled_fp8"):
            continue
        layer = strip(k[: -len(".weight")])
        fmt = formats.get(layer)
        if fmt is None and not info.is_fp8:
            continue
        full = prefix + layer if k.startswith(prefix) else layer
        scale_key = scale_key_of(files, full)
        per_row = scale_key is not None and len(files.info(scale_key).shape) == 1 and files.info(scale_key).shape[0] > 1
        dtype = FP8_DTYPES[fmt] if fmt else (torch.float8_e5m2 if info.dtype == "F8_E5M2" else torch.float8_e4m3fn)
        # Legacy scale_input is ignored, as ComfyUI does: dynamic activation scaling is always correct.
        input_key = f"{full}.input_scale" if f"{full}.input_scale" in keys else None
        out[layer] = LayerQuant(dtype=dtype, per_row=per_row, has_scale=scale_key is not None,
                                has_input_scale=input_key is not None)
    if not out:
        return "none", out
    if scheme is None:
        if any(q.per_row for q in out.values()):
            scheme = "bfl-fp8r"
        elif any(q.has_scale for q in out.values()):
            scheme = "comfy-fp8"
        else:
            scheme = "fp8-unscaled"
    return scheme, out


def scale_key_of(files, layer: str) -> str | None:
    """The full name of a layer's weight scale (``weight_scale`` or legacy ``scale_weight``), if it has one."""
    return next((f"{layer}.{s}" for s in _SCALE_NAMES if f"{layer}.{s}" in files), None)


def read_fp8_layer(files, layer: str, q: LayerQuant) -> tuple[Tensor, Tensor]:
    """``(weight as q.dtype, fp32 scale: () or (rows,))`` of an FP8 layer ``layer`` (full name)."""
    w = files.get(f"{layer}.weight")
    if w.dtype == torch.uint8:  # some ComfyUI files store FP8 bytes as uint8
        w = w.view(q.dtype)
    scale_key = scale_key_of(files, layer)
    scale = files.get(scale_key).float() if scale_key else torch.ones((), dtype=torch.float32)
    return w.to(q.dtype), (scale.reshape(-1) if q.per_row else scale.reshape(()))


def read_dequantized(files, layer: str, q: LayerQuant | None) -> Tensor:
    """A layer's weight as fp32 (FP8 layers dequantized as ``w.float() * scale``), or as stored when not FP8."""
    if q is None:
        return files.get(f"{layer}.weight")
    w, scale = read_fp8_layer(files, layer, q)
    return w.float() * (scale[:, None] if q.per_row else scale)
