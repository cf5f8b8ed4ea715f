"""GGUF numerics: which types flux2kit runs, dequantizing packed blocks, quantizing for the GGUF writer.

Dequantization is diffusers' (``diffusers.quantizers.gguf.utils``, a torch port of ComfyUI-GGUF's
kernels), called per block type with ``dtype=torch.float32``. diffusers' own ``GGUFLinear`` passes
``dtype=None``, which keeps the fp16 block scales in fp16 and multiplies in fp16: about 5e-4 relative
error per weight and an fp16 result that is then rounded again to bf16. With fp32 every supported
type comes out bit-identical to ``gguf.quants.dequantize`` (the reference implementation; the tests
check each type), and the one rounding to the compute dtype happens at the end. Large tensors are
dequantized in row chunks straight into the output, so the fp32 intermediate of a 6144 x 55296 layer
never exists at once (on a GPU that would be 1.4 GB next to the 0.7 GB bf16 result).

Quantizing (for ``flux2kit quantize --format gguf-q8_0``) is ``gguf.quants.quantize``, bit-exact with
llama.cpp for the types it implements (BF16, Q8_0, Q5_0/1, Q4_0/1); K-quants need llama.cpp itself.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UnsupportedFormatError

# Rows of at most this many values are dequantized at once (64 MB of fp32 intermediates).
CHUNK_VALUES = 1 << 24
_FLOAT_VIEWS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _diffusers_gguf():
    from diffusers.quantizers.gguf import utils

    return utils


def _types():
    import gguf

    T = gguf.GGMLQuantizationType
    types = {T.F32, T.F16, *_diffusers_gguf().SUPPORTED_GGUF_QUANT_TYPES}
    return tuple(sorted(types, key=lambda t: (-bits_per_weight(t), t.name)))  # F32, F16, BF16, Q8_0, ... Q2_K


class _SupportedTypes:
    """The GGUF types flux2kit runs: F32, F16 and every type diffusers dequantizes (read lazily: imports gguf)."""

    def __iter__(self):
        return iter(_types())

    def __contains__(self, item) -> bool:
        return item in _types()


SUPPORTED_TYPES = _SupportedTypes()


def type_by_name(name: str):
    """The ``gguf.GGMLQuantizationType`` called ``name`` ("Q8_0", "q4_k", ...)."""
    import gguf

    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise UnsupportedFormatError(f"{name!r} is not a GGUF type; flux2kit runs "
                                     f"{', '.join(t.name for t in SUPPORTED_TYPES)}.") from None


def bits_per_weight(ggml_type) -> float:
    """Storage bits per value of a type: 8.5 for Q8_0, 4.5 for Q4_K, 16 for BF16, ..."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    return 8.0 * size / block


def dequantize(packed: torch.Tensor, ggml_type, shape, dtype: torch.dtype = torch.float32, *,
               keep_half: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed GGUF bytes ``(*rows, bytes_per_row)`` -> a ``shape`` tensor of ``dtype``.

    F32/F16/BF16 are reinterpreted (a view when the dtype matches, or with ``keep_half`` for F16/BF16);
    quantized types go through diffusers' block dequantizers in fp32, in row chunks, into ``out``
    (allocated when not given) on ``packed``'s device.
    """
    name = ggml_type.name
    shape = tuple(int(s) for s in shape)
    if name in _FLOAT_VIEWS:
        values = packed.contiguous().view(torch.uint8).view(_FLOAT_VIEWS[name]).reshape(shape)
        if keep_half and name != "F32":
            return values
        return values if values.dtype == dtype else values.to(dtype)
    if ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedFormatError(
            f"GGUF type {name} cannot be dequantized; flux2kit runs {', '.join(t.name for t in SUPPORTED_TYPES)}.")
    utils = _diffusers_gguf()
    block, size = utils.GGML_QUANT_SIZES[ggml_type]
    fn = utils.dequantize_functions[ggml_type]
    cols = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    data = packed.reshape(rows, cols // block * size)
    if out is None and rows * cols <= CHUNK_VALUES:  # one pass: no output buffer to copy into
        values = fn(data.reshape(-1, size), block, size, torch.float32).reshape(shape)
        return values if dtype == torch.float32 else values.to(dtype)
    result = out if out is not None else torch.empty((rows, cols), dtype=dtype, device=packed.device)
    result = result.view(rows, cols)
    step = max(1, CHUNK_VALUES // max(cols, 1))
    for start in range(0, rows, step):
        part = data[start:start + step]
        blocks = part.reshape(-1, size)
        result[start:start + step] = fn(blocks, block, size, torch.float32).reshape(part.shape[0], cols)
    return result.view(shape)


def quantize(values: torch.Tensor, ggml_type) -> np.ndarray:
    """``gguf.quants.quantize`` of a float tensor, in row chunks: ``(*rows, bytes_per_row)`` uint8.

    F32 and F16 come back as their own dtype (the gguf writer stores those unpacked).
    """
    import gguf

    array = values.detach().float().cpu().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return array
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    rows = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)
    step = max(1, CHUNK_VALUES // max(rows.shape[1], 1))
    parts = [gguf.quants.quantize(rows[i:i + step], ggml_type) for i in range(0, rows.shape[0], step)]
    packed = np.concatenate(parts, axis=0)
    return packed.reshape(*array.shape[:-1], packed.shape[-1])


def can_quantize(shape, ggml_type) -> bool:
    """Whether rows of ``shape`` split into whole blocks of ``ggml_type`` (the writer's fallback test)."""
    import gguf

    return len(shape) >= 1 and shape[-1] % gguf.GGML_QUANT_SIZES[ggml_type][0] == 0
