"""How much memory a checkpoint will take once loaded, from its header alone (shown before loading).

The loaders keep GGUF weights packed and FP8 weights FP8 (about the file's bytes), cast every other
tensor to the compute dtype, and dequantize one layer at a time for its matmul. So:

- ``resident``: the weights after loading; on the GPU without block offload, in system RAM with it
  (plus ``non_block`` on the GPU).
- ``largest_layer``: one layer's weight dequantized into the compute dtype, the temporary each call
  adds (packed layers only).
- ``largest_block``: the transformer block block offload puts on the GPU at a time.

Activations come on top (they depend on the image size, not on the file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

# Token embeddings look up rows (GGUFEmbedding dequantizes only the prompt's), never the whole table.
_EMBEDDINGS = ("embed_tokens.weight", "token_embd.weight")
_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class TensorCost:
    """One tensor as the loader will hold it."""

    name: str  # without the checkpoint's prefix
    numel: int
    stored_bytes: int  # bytes as stored in the file
    kept_as_stored: bool  # packed GGUF / FP8 weights stay as stored; everything else is cast to the compute dtype


@dataclass(frozen=True)
class MemoryEstimate:
    file_bytes: int  # bytes of the tensors the loader reads
    resident: int
    largest_layer: int
    blocks: int  # the part of ``resident`` in transformer blocks (0 for text encoders)
    largest_block: int

    @property
    def non_block(self) -> int:
        return self.resident - self.blocks

    @property
    def offload_gpu(self) -> int:
        """GPU memory for weights with block offload: everything outside the blocks, one block, one layer's temporary."""
        return self.non_block + self.largest_block + self.largest_layer

    def describe(self, *, blocks: bool = True) -> str:
        gb = size_text
        text = (f"weights in memory {gb(self.resident)} (reads {gb(self.file_bytes)} of the file), plus "
                f"{gb(self.largest_layer)} while the largest layer runs")
        if blocks and self.blocks:
            text += (f"; with block offload {gb(self.offload_gpu)} on the GPU and {gb(self.blocks)} in system RAM")
        return text + "; activations come on top"


def size_text(n: float) -> str:
    """``18.49 GB`` / ``312.5 MB`` (decimal units, as file sizes are published)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def estimate(costs: Iterable[TensorCost], dtype: torch.dtype) -> MemoryEstimate:
    """What ``costs`` take once loaded with compute dtype ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    file_bytes = resident = largest_layer = 0
    per_block: dict[str, int] = {}
    for c in costs:
        held = c.stored_bytes if c.kept_as_stored else c.numel * itemsize
        file_bytes += c.stored_bytes
        resident += held
        if c.kept_as_stored and not c.name.endswith(_EMBEDDINGS):
            largest_layer = max(largest_layer, c.numel * itemsize)
        m = _BLOCK.match(c.name)
        if m:
            per_block[m.group(0)] = per_block.get(m.group(0), 0) + held
    return MemoryEstimate(file_bytes=file_bytes, resident=resident, largest_layer=largest_layer,
                          blocks=sum(per_block.values()), largest_block=max(per_block.values(), default=0))


def checkpoint_costs(files, prefix: str = "", keep=lambda name: True) -> list[TensorCost]:
    """The :class:`TensorCost` of every tensor under ``prefix`` that ``keep`` accepts (name without prefix).

    GGUF files: 2-D weights not stored as F32 stay packed (as the loaders keep them). Safetensors:
    FP8 tensors stay FP8.
    """
    from .gguf import GGUFTensors, packed_layers

    gguf = isinstance(files, GGUFTensors)
    packed = {f"{layer}.weight" for layer in packed_layers(files, prefix)} if gguf else set()
    costs = []
    for key in files.keys():
        if not key.startswith(prefix) or not keep(key[len(prefix):]):
            continue
        name = key[len(prefix):]
        if gguf:
            t = files.tensor(key)
            numel = 1
            for s in t.shape:
                numel *= int(s)
            costs.append(TensorCost(name, numel, t.nbytes, name in packed))
        else:
            info = files.info(key)
            numel = 1
            for s in info.shape:
                numel *= int(s)
            size = torch.empty((), dtype=_torch_dtype(info.dtype)).element_size()
            costs.append(TensorCost(name, numel, numel * size, info.is_fp8))
    return costs


def _torch_dtype(name: str) -> torch.dtype:
    from .safetensors import TORCH_DTYPES

    return TORCH_DTYPES.get(name, torch.float32)


def transformer_estimate(ckpt, dtype: torch.dtype) -> MemoryEstimate:
    """The memory a transformer checkpoint (``inspect_transformer``) takes loaded with its weights as stored."""
    return estimate(checkpoint_costs(ckpt.files, ckpt.prefix), dtype)


def text_encoder_estimate(ckpt, dtype: torch.dtype) -> MemoryEstimate:
    """The same for a text encoder: only the embedding and the layers FLUX.2 reads count."""
    from .text_encoder_checkpoint import is_kept_key

    return estimate(checkpoint_costs(ckpt.files, ckpt.prefix, lambda name: is_kept_key(name, ckpt.family)), dtype)


def describe_before_loading(path, kind: str, dtype: torch.dtype, *, tokenizer_given: bool = True) -> str:
    """One paragraph for a loader to show before it loads ``path``: what the file is and what it will take.

    ``kind`` is "transformer" or "text_encoder". Reads headers only.
    """
    from .gguf import GGUFTensors, describe_mix

    if kind == "transformer":
        from .transformer_checkpoint import inspect_transformer

        ckpt = inspect_transformer(path)
        estimate, keys = transformer_estimate(ckpt, dtype), None
    else:
        from .text_encoder_checkpoint import inspect_text_encoder, is_kept_key

        ckpt = inspect_text_encoder(path, tokenizer_given=tokenizer_given)
        estimate = text_encoder_estimate(ckpt, dtype)
        keys = [k for k in ckpt.files.keys() if k.startswith(ckpt.prefix)
                and is_kept_key(k[len(ckpt.prefix):], ckpt.family)]
    try:
        lines = [ckpt.description]
        if isinstance(ckpt.files, GGUFTensors):
            lines.append("by size" + (" (what FLUX.2 reads)" if keys is not None else "") + ": "
                         + describe_mix(ckpt.files.type_mix(keys)))
        lines.append(estimate.describe(blocks=kind == "transformer"))
        return "\n".join(lines)
    finally:
        ckpt.files.close()
