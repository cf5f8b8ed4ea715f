"""GGUF layers: a Linear and an Embedding whose weights stay packed GGUF blocks in memory.

As FP8Linear holds FP8 weights, :class:`GGUFLinear` holds the file's packed bytes (Q4_K, Q8_0, BF16,
...) in a uint8 buffer and dequantizes them for each call, just for its own matmul, into the dtype of
its input (the model's compute dtype: fp32, bf16 or fp16, chosen when loading). Memory stays about
the file size; the dense weight of one layer exists only during that layer's call.

Buffers rather than Parameters, as for FP8Linear: diffusers' ``ModelMixin.dtype`` reports the first
parameter's dtype, and a uint8 weight there would make pipelines cast inputs to uint8. Buffers move
with ``.to`` (block offload moves them with their block). ``in_features`` / ``out_features`` are
those of the Linear it replaces, so wrappers that add a side branch (LoRA) see an ordinary linear;
the packed weight itself cannot be merged into (a K-quant cannot be re-quantized), so such a branch
must stay beside it.

:class:`GGUFEmbedding` gathers the packed rows of the token ids it is given and dequantizes only
those: a 131072 x 5120 Mistral embedding stays 0.4-1.4 GB of blocks instead of 1.3-2.7 GB of floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files.gguf_quants import dequantize


def _byte_width(features: int, ggml_type) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    return features // block * size


def _ggml_type(value):
    import gguf

    return gguf.GGMLQuantizationType(value)


class GGUFLinear(nn.Module):
    """A Linear layer whose weight stays packed GGUF blocks ``(out_features, bytes_per_row)`` in a buffer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, ggml_type,
                 compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ggml_type = _ggml_type(ggml_type)
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.empty(out_features, _byte_width(in_features, self.ggml_type),
                                                   dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=compute_dtype, device=device))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, type={self.ggml_type.name}")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """A new dense ``(out_features, in_features)`` copy of the weight in ``dtype`` (default: the compute dtype)."""
        return dequantize(self.weight, self.ggml_type, (self.out_features, self.in_features),
                          dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        # The activations' dtype is the model's compute dtype; following it (as FP8Linear does) means a
        # caller holding fp32 inputs for a bf16 model never meets a dtype mismatch inside F.linear.
        dtype = x.dtype if x.is_floating_point() else self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized_weight(dtype), bias)


class GGUFEmbedding(nn.Module):
    """A token embedding whose table stays packed GGUF blocks; only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, ggml_type, padding_idx: int | None = None,
                 compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.ggml_type = _ggml_type(ggml_type)
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.empty(num_embeddings, _byte_width(embedding_dim, self.ggml_type),
                                                   dtype=torch.uint8, device=device))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.ggml_type.name}"

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1).to(self.weight.device)
        rows = self.weight.index_select(0, flat)
        values = dequantize(rows, self.ggml_type, (flat.numel(), self.embedding_dim), self.compute_dtype)
        return values.reshape(*ids.shape, self.embedding_dim)


def gguf_layers(module: nn.Module) -> list[nn.Module]:
    """Every GGUFLinear and GGUFEmbedding inside ``module`` (including itself), in module order."""
    return [m for m in module.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))]


def gguf_module_for(module: nn.Module, ggml_type, *, compute_dtype: torch.dtype) -> nn.Module | None:
    """The packed twin (on meta) of an ``nn.Linear`` or ``nn.Embedding``; None for any other module."""
    if isinstance(module, nn.Linear):
        return GGUFLinear(module.in_features, module.out_features, module.bias is not None, ggml_type=ggml_type,
                          compute_dtype=compute_dtype, device="meta")
    if isinstance(module, nn.Embedding):
        return GGUFEmbedding(module.num_embeddings, module.embedding_dim, ggml_type=ggml_type,
                             padding_idx=module.padding_idx, compute_dtype=compute_dtype, device="meta")
    return None
