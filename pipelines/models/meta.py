"""Building models on the meta device and filling them one tensor at a time (the loaders' one helper).

A loader builds the model with ``torch.device("meta")`` (no memory), puts each tensor read from a
file straight into its slot with :func:`assign` (no copy, no second model), and asks
:func:`missing_tensors` at the end which slots were never filled.
"""

from __future__ import annotations

import torch
from torch import nn


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the sub-module at dotted ``path`` (e.g. swap a Linear for an FP8Linear)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer ``name`` (dotted, relative to ``model``).

    Parameters stay parameters (frozen), buffers stay buffers; an unknown name raises KeyError and a
    missing sub-module AttributeError, so a caller can report tensors that have no place in the model.
    """
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise KeyError(name)


def missing_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device (never filled)."""
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
