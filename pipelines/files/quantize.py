"""Quantize bf16/fp32 weights to FP8: in memory while loading, or into a file in ComfyUI's current format.

Both paths go through one object, a *quantized view* of a checkpoint: it presents the tensors a
ComfyUI FP8 file would hold (the big linears as ``weight`` float8_e4m3fn + ``weight_scale`` fp32
scalar + ``comfy_quant`` JSON, everything else as stored), computing each layer from the source
file only when it is read. The loaders read that view exactly as they read a ComfyUI FP8 file, and
``save_fp8_*`` streams the same view to disk, so a model quantized while loading holds the very
tensors a file quantized offline holds, and a file on disk never needs the whole model in memory.

Scales: one per tensor (``weight_scale`` a scalar), not one per row. Measured (relative Frobenius
error of the dequantized weight; ``tests/pipelines/test_quantize.py`` checks these bounds):

- tiny transformer block linears: per-tensor 2.55%, per-row 2.54%; tiny Mistral linears 2.65% vs
  2.58%; tiny Qwen3 linears 2.65% vs 2.51%.
- 1024x1024 Gaussian with 4 outlier rows scaled up: error of the other rows, per-tensor vs per-row,
  2.65% vs 2.64% at 10x, 100x and 1000x; 5.2% vs 2.64% only at 10000x.

e4m3fn is a float format: a row whose range is 1000x below the tensor's still lands on normal
FP8 numbers (2^-6..448 in scaled units) with the same 3-bit mantissa; per-row scales pay off only
for rows ~10^4 below the largest, which trained FLUX.2 / Mistral / Qwen weights do not have (their
outliers are in activations, which FP8 matmuls scale per call). Per-tensor is also the only scale
ComfyUI's current format carries (a per-row file would not load there), and quantize-on-load must
equal the saved file. ``fp8.quantize_weight(per_row=True)`` stays available for experiments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .fp8 import COMFY_FP8, LayerQuant, quantize_weight, read_dequantized, scan_quantization
from .safetensors import ST_DTYPES, TensorInfo, write_safetensors
from .text_encoder_checkpoint import (
    COMFY_PREFIX,
    CONFIG_METADATA_KEY,
    LAYER_KEY,
    TEKKEN_KEY,
    TextEncoderCheckpoint,
    config_record,
    find_tokenizer_dir,
    inspect_text_encoder,
    resolve_folders,
)
from .tokenizers import load_tokenizer, tekken_from_tokenizer
from .transformer_checkpoint import TransformerCheckpoint, bfl_modules, inspect_transformer, map_bfl_key

FP8_FORMAT = "float8_e4m3fn"
COMFY_TRANSFORMER_PREFIX = "model.diffusion_model."
_COMFY_QUANT = json.dumps({"format": FP8_FORMAT}).encode("utf-8")


def comfy_quant_tensor() -> torch.Tensor:
    """The per-layer ``comfy_quant`` tensor ComfyUI reads: UTF-8 JSON bytes as uint8."""
    return torch.tensor(list(_COMFY_QUANT), dtype=torch.uint8)


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one quantization rule used everywhere here: float8_e4m3fn with one fp32 scale (amax / 448)."""
    return quantize_weight(weight.float(), per_row=False, dtype=torch.float8_e4m3fn)


def is_quantizable_transformer_layer(layer: str) -> bool:
    """Block linears (BFL names), as ComfyUI's fp8mixed files quantize: embedders, modulation and the
    final layer stay bf16 (small, and most sensitive)."""
    return layer.startswith(("double_blocks.", "single_blocks.")) and "norm" not in layer


_TE_LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")


def is_quantizable_text_encoder_layer(layer: str) -> bool:
    """Decoder-layer linears (attention and MLP projections); embeddings and norms stay as stored."""
    return bool(_TE_LINEAR.search(layer))


# ----------------------------------------------------------------------------------------------
# The quantized view


@dataclass
class _Source:
    """How to produce one tensor of the view: ``fn()`` returns it; dtype/shape are known up front."""

    info: TensorInfo
    fn: Callable[[], torch.Tensor]


@dataclass
class QuantizedView:
    """A read-only, TensorFile-like mapping (``keys``/``get``/``info``) over quantized tensors.

    Layers are quantized when first read and the last one is cached, so reading a layer's
    ``weight`` then its ``weight_scale`` quantizes it once.
    """

    name: str
    sources: dict[str, _Source]
    metadata: dict[str, str] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def keys(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, key: object) -> bool:
        return key in self.sources

    def info(self, key: str) -> TensorInfo:
        return self.sources[key].info

    def items_info(self) -> Iterator[tuple[str, TensorInfo]]:
        for k, s in self.sources.items():
            yield k, s.info

    def get(self, key: str) -> torch.Tensor:
        return self.sources[key].fn()

    def close(self) -> None:
        for close in self.closers:
            close()

    def __enter__(self) -> "QuantizedView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LayerCache:
    """Quantize a layer's weight once, whichever of its tensors is read first."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, key: str, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        if self.key != key:
            self.key, self.value = None, None  # drop the previous layer before making the next
            self.value = make()
            self.key = key
        return self.value


def _info(t_dtype: torch.dtype, shape) -> TensorInfo:
    return TensorInfo(ST_DTYPES[t_dtype], tuple(int(s) for s in shape))


def _add_quantized(sources: dict, cache: _LayerCache, layer: str, shape, read_float: Callable[[], torch.Tensor]):
    """Register ``layer.weight`` (fp8), ``layer.weight_scale`` and ``layer.comfy_quant``."""
    make = lambda: quantize_tensor(read_float())  # noqa: E731
    sources[f"{layer}.weight"] = _Source(_info(torch.float8_e4m3fn, shape), lambda: cache.get(layer, make)[0])
    sources[f"{layer}.weight_scale"] = _Source(_info(torch.float32, ()), lambda: cache.get(layer, make)[1].clone())
    sources[f"{layer}.comfy_quant"] = _Source(_info(torch.uint8, (len(_COMFY_QUANT),)), comfy_quant_tensor)


# ----------------------------------------------------------------------------------------------
# Transformer


def _reader(files, key: str, q: LayerQuant | None) -> Callable[[], torch.Tensor]:
    """Read a tensor; an FP8 weight is dequantized to fp32 first (so re-quantizing an FP8 file works)."""
    if q is None:
        return lambda: files.get(key)
    return lambda: read_dequantized(files, key[: -len(".weight")], q)


def bfl_sources(ckpt: TransformerCheckpoint) -> dict[str, tuple[TensorInfo, Callable[[], torch.Tensor], bool]]:
    """BFL name -> (info of the float tensor, reader, was FP8) for every model tensor of the checkpoint."""
    files, prefix = ckpt.files, ckpt.prefix
    out = {}
    if ckpt.layout == "bfl":
        for key, info in files.items_info():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            module, _, param = name.rpartition(".")
            if param in ("weight_scale", "input_scale", "scale_weight", "scale_input", "comfy_quant") or \
                    name.endswith("scaled_fp8"):
                continue
            q = ckpt.layers.get(module) if param == "weight" else None
            dtype = "F32" if q is not None else info.dtype
            out[name] = (TensorInfo(dtype, info.shape), _reader(files, key, q), q is not None)
        return out
    # diffusers layout: rebuild each BFL tensor from its diffusers parts (the inverse of map_bfl_key)
    for module in bfl_modules(ckpt.config):
        for param in ("scale",) if "norm" in module else ("weight", "bias"):  # BFL calls norm weights scale
            targets = map_bfl_key(f"{module}.{param}")
            keys = [f"{prefix}{t.module}.{t.param}" for t in targets]
            if not keys or not all(k in files for k in keys):
                continue
            q = [ckpt.layers.get(f"{t.module}") if t.param == "weight" else None for t in targets]
            readers = [_reader(files, k, qi) for k, qi in zip(keys, q)]
            infos = [files.info(k) for k in keys]
            op = targets[0].op
            any_q = any(qi is not None for qi in q)
            dtype = "F32" if any_q else infos[0].dtype
            if op and op[0] == "chunk":
                shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:])
                read = (lambda rs=readers: torch.cat([r() for r in rs], dim=0))
            elif op and op[0] == "swap":  # diffusers scale|shift -> BFL shift|scale
                shape = infos[0].shape
                read = (lambda r=readers[0]: torch.cat(tuple(reversed(r().chunk(2, dim=0))), dim=0))
            else:
                shape = infos[0].shape
                read = readers[0]
            out[f"{module}.{param}"] = (TensorInfo(dtype, tuple(shape)), read, any_q)
    return out


def quantized_transformer_view(ckpt: TransformerCheckpoint, *, prefix: str = COMFY_TRANSFORMER_PREFIX) -> QuantizedView:
    """The ComfyUI FP8 file this checkpoint quantizes to (BFL names under ``prefix``), as a lazy view.

    Block linears are quantized per tensor; layers the source already stores as FP8 are dequantized
    and re-quantized the same way (ComfyUI reads only per-tensor scales); other tensors pass through.
    """
    sources: dict[str, _Source] = {}
    cache = _LayerCache()
    for name, (info, read, was_fp8) in bfl_sources(ckpt).items():
        layer, _, param = name.rpartition(".")
        if param == "weight" and len(info.shape) == 2 and (is_quantizable_transformer_layer(layer) or was_fp8):
            _add_quantized(sources, cache, prefix + layer, info.shape, read)
        else:
            if was_fp8:  # an FP8 tensor outside a linear layer: store it dequantized
                sources[prefix + name] = _Source(_info(torch.bfloat16, info.shape),
                                                 lambda r=read: r().to(torch.bfloat16))
            else:
                sources[prefix + name] = _Source(info, read)
    return QuantizedView(name=ckpt.files.name, sources=dict(sorted(sources.items())),
                         closers=[ckpt.files.close])


def quantized_transformer_checkpoint(ckpt: TransformerCheckpoint) -> TransformerCheckpoint:
    """``ckpt`` as the ComfyUI FP8 checkpoint it quantizes to (BFL layout, no prefix), for the loader."""
    view = quantized_transformer_view(ckpt, prefix="")
    layers = {k[: -len(".comfy_quant")]: COMFY_FP8 for k in view.keys() if k.endswith(".comfy_quant")}
    return dataclasses.replace(ckpt, files=view, layout="bfl", quantization="comfy-fp8", prefix="", layers=layers)


def save_fp8_transformer(src: str | os.PathLike, out: str | os.PathLike, *, header_metadata: bool = True) -> str:
    """Write the transformer at ``src`` (any layout we load) as a ComfyUI FP8 ("fp8mixed") single file.

    Per quantized layer: ``weight`` float8_e4m3fn, ``weight_scale`` fp32 scalar and a ``comfy_quant``
    tensor ``{"format": "float8_e4m3fn"}`` (what ComfyUI's own save writes); with ``header_metadata``
    the same list also goes into the ``_quantization_metadata`` header entry, which ComfyUI reads
    too. Names are BFL's under ``model.diffusion_model.``, the layout ComfyUI's UNETLoader detects.
    """
    ckpt = inspect_transformer(src)
    with quantized_transformer_view(ckpt) as view:
        # The source's own metadata goes along (e.g. [klein]'s is_distilled), less its quantization list.
        metadata = {k: v for k, v in ckpt.files.metadata.items() if k != "_quantization_metadata"}
        if getattr(ckpt, "distilled", None) is not None:  # e.g. read from a diffusers model_index.json
            metadata["is_distilled"] = str(bool(ckpt.distilled)).lower()
        metadata["flux2kit.quantized_from"] = os.path.basename(os.fspath(src).rstrip("/"))
        if header_metadata:
            # Names relative to the model, as ComfyUI's UNETLoader applies the entry again after it strips
            # model.diffusion_model.: full names would come back as stray keys ("unet unexpected: ...").
            metadata["_quantization_metadata"] = quantization_metadata(view, strip=COMFY_TRANSFORMER_PREFIX)
        write_safetensors(out, view, metadata=metadata)
    return os.fspath(out)


def quantization_metadata(view: QuantizedView, *, strip: str = "") -> str:
    """The ``_quantization_metadata`` header JSON for the quantized layers of ``view`` (names less ``strip``).

    ComfyUI's text encoder loader applies the entry once to the file's own keys (full names); its
    diffusion model loader applies it again after removing ``model.diffusion_model.`` (pass that as
    ``strip``: the first pass then adds keys the prefix filter drops, the second the right ones).
    """
    layers = {}
    for k in view.keys():
        if k.endswith(".comfy_quant"):
            name = k[: -len(".comfy_quant")]
            layers[name[len(strip):] if strip and name.startswith(strip) else name] = {"format": FP8_FORMAT}
    return json.dumps({"format_version": "1.0", "layers": layers})


# ----------------------------------------------------------------------------------------------
# Text encoders, in ComfyUI's single-file form


def canonical_sources(files, prefix: str) -> dict[str, tuple[TensorInfo, Callable[[], torch.Tensor], LayerQuant | None]]:
    """Language-model tensors by name without prefix (``layers.0.mlp.up_proj.weight`` ...), FP8 side tensors folded in."""
    _, layers = scan_quantization(files, prefix)
    out = {}
    for key, info in files.items_info():
        if not key.startswith(prefix) or key == TEKKEN_KEY:
            continue
        name = key[len(prefix):]
        layer, _, param = name.rpartition(".")
        if not (LAYER_KEY.match(name) or name.startswith(("embed_tokens.", "norm."))):
            continue  # vision tower, projector, LM head
        if param in ("weight_scale", "input_scale", "scale_weight", "scale_input", "comfy_quant") or \
                name.endswith("scaled_fp8") or name.endswith("rotary_emb.inv_freq"):
            continue
        q = layers.get(layer) if param == "weight" else None
        out[name] = (info if q is None else TensorInfo("F32", info.shape), _reader(files, key, q), q)
    return out


def text_encoder_view(files, prefix: str, *, quantize: bool, extra: dict[str, _Source] | None = None,
                      metadata: dict[str, str] | None = None) -> QuantizedView:
    """The ComfyUI single file for a language model in ``files`` (keys ``model.*``), as a lazy view.

    With ``quantize`` the decoder-layer linears are FP8 (per-tensor e4m3fn, ``comfy_quant``);
    layers stored as FP8 in the source are dequantized and re-quantized the same way.
    """
    sources: dict[str, _Source] = {}
    cache = _LayerCache()
    for name, (info, read, q) in canonical_sources(files, prefix).items():
        layer, _, param = name.rpartition(".")
        if param == "weight" and len(info.shape) == 2 and (q is not None or (
                quantize and is_quantizable_text_encoder_layer(layer))):
            _add_quantized(sources, cache, COMFY_PREFIX + layer, info.shape, read)
            continue
        sources[COMFY_PREFIX + name] = _Source(info, read)
    sources.update(extra or {})
    return QuantizedView(name=files.name, sources=dict(sorted(sources.items())), metadata=dict(metadata or {}),
                         closers=[files.close])


def quantized_text_encoder_checkpoint(ckpt: TextEncoderCheckpoint) -> TextEncoderCheckpoint:
    """``ckpt`` as the FP8 single file ``save_text_encoder_file(quantize=True)`` writes, read lazily."""
    view = text_encoder_view(ckpt.files, ckpt.prefix, quantize=True)
    layers = {k[len(COMFY_PREFIX): -len(".comfy_quant")]: COMFY_FP8 for k in view.keys() if k.endswith(".comfy_quant")}
    return dataclasses.replace(ckpt, files=view, prefix=COMFY_PREFIX, layers=layers, quantization="comfy-fp8")


def save_text_encoder_file(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quantize: bool = True,
    tokenizer: str | os.PathLike | None = None,
    header_metadata: bool = True,
) -> str:
    """Write a FLUX.2 text encoder as a ComfyUI single file (FP8 with ``quantize``, else as stored).

    ``src``: a single file, or a Hugging Face folder (its tokenizer becomes the Mistral file's
    ``tekken_model``; ComfyUI's Qwen3 files carry no tokenizer). All layers of the source are written.
    """
    ckpt = inspect_text_encoder(src, tokenizer_given=True)
    tekken = None
    try:
        if ckpt.family == "mistral":
            if tokenizer is not None:
                tekken = tekken_from_tokenizer(load_tokenizer(os.fspath(tokenizer), ckpt.family))
            elif ckpt.single_file:
                tekken = ckpt.files.get(TEKKEN_KEY).numpy().tobytes() if TEKKEN_KEY in ckpt.files else None
            else:
                folder = find_tokenizer_dir(resolve_folders(os.fspath(src))[1], ckpt.family)
                tekken = tekken_from_tokenizer(load_tokenizer(folder, ckpt.family))
    except BaseException:
        ckpt.files.close()
        raise
    return write_comfy_text_encoder(ckpt.files, ckpt.prefix, ckpt.config, out, quantize=quantize, tekken=tekken,
                                    header_metadata=header_metadata)


def write_comfy_text_encoder(files, prefix: str, config, out, *, quantize: bool, tekken: bytes | None = None,
                             header_metadata: bool = True) -> str:
    """Stream the language model in ``files`` (under ``prefix``) to ``out`` as a ComfyUI single file."""
    extra = {}
    if tekken is not None:
        data = torch.frombuffer(bytearray(tekken), dtype=torch.uint8)
        extra[TEKKEN_KEY] = _Source(_info(torch.uint8, data.shape), lambda: data)
    metadata = {CONFIG_METADATA_KEY: json.dumps(config_record(config))}
    with text_encoder_view(files, prefix, quantize=quantize, extra=extra) as view:
        if header_metadata and any(k.endswith(".comfy_quant") for k in view.keys()):
            metadata["_quantization_metadata"] = quantization_metadata(view)
        write_safetensors(out, view, metadata=metadata)
    return os.fspath(out)
