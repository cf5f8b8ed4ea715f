"""Comparing tensors bit for bit (FP8 included, which has no ``==``)."""

from __future__ import annotations

import torch


def same_tensors(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (dtype, shape or any bit); the two state dicts must hold the same names."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    bits = lambda t: t.view(torch.uint8) if t.element_size() == 1 else t  # noqa: E731  (fp8 has no ==)
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(bits(a[k]), bits(b[k]))]
