"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse
import re

from ..pipelines.parameters import RESOLUTIONS


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 256x256, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_resolution(text: str) -> str:
    try:
        megapixels = float(re.sub(r"\s*mp$", "", text.strip().lower()))
    except ValueError:
        megapixels = None
    for name, value in RESOLUTIONS.items():
        if value == megapixels:
            return name
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(RESOLUTIONS)}, got {text!r}")
