"""Where to compute and in which dtype."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs; fp32 on the CPU, where bf16 matmul is several times slower (no bf16 units)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
