"""How Mistral-Small-3.x sees an image: Pixtral's preprocessing and the ``[IMG]`` tokens that stand for it.

transformers' ``PixtralProcessor`` does this, but in transformers 5 it requires torchvision
(``@requires(backends=("torchvision", "torch"))``), which flux2kit's own environment does not have
(PyPI's torchvision does not import beside the CPU build of torch the command line uses). So the
processor's two steps are done here with transformers' own parts: the image goes through
``PixtralImageProcessorPil`` (the PIL backend: what Black Forest Labs' reference code uses with
``use_fast=False``; diffusers' ``AutoProcessor`` default picks the torchvision backend, whose pixels
differ by up to about 0.015 after normalisation), and each ``[IMG]`` of the rendered chat text becomes
rows of ``[IMG]`` tokens ended by ``[IMG_BREAK]``, the last one ``[IMG_END]`` (``PixtralProcessor.
replace_image_token``). The tests check the result token for token and pixel for pixel against
transformers' ``PixtralProcessor`` with the same image processor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..errors import Flux2KitError

IMAGE_TOKEN, BREAK_TOKEN, END_TOKEN = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
# Pixtral preprocessing settings read from a tokenizer folder's preprocessor_config.json (or the
# image_processor entry of processor_config.json); anything else there is the processor's own business.
_IMAGE_PROCESSOR_KEYS = ("size", "image_mean", "image_std", "resample", "rescale_factor", "do_convert_rgb",
                         "do_normalize", "do_rescale", "do_resize")


def image_processor_class():
    """transformers' PIL-backend Pixtral image processor (``PixtralImageProcessorPil`` in transformers 5;
    in 4.x the PIL one is ``PixtralImageProcessor``)."""
    try:
        from transformers import PixtralImageProcessorPil as cls
    except ImportError:  # transformers 4.x
        from transformers import PixtralImageProcessor as cls
    return cls


@dataclass
class PixtralInputs:
    """Turns a chat text with ``[IMG]`` placeholders and its images into the model's inputs."""

    image_processor: object
    patch_size: int  # the vision tower's patch size (14 for Mistral-Small-3.x)
    merge: int  # spatial_merge_size: merge x merge patches become one image token (2)

    @classmethod
    def for_model(cls, config, folder: str | None = None) -> "PixtralInputs":
        """From a Mistral3 config, with the preprocessing settings of ``folder`` (a tokenizer folder) when it has them."""
        vision = config.vision_config
        settings = {"size": {"longest_edge": int(vision.image_size)}}
        settings.update(read_image_processor_settings(folder) if folder else {})
        return cls(image_processor_class()(**settings), int(vision.patch_size), int(config.spatial_merge_size))

    def pixels(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(pixel_values (1, 3, H, W), (H, W))`` of one PIL image, as the processor computes them."""
        out = self.image_processor(images=[image], patch_size=self.patch_size * self.merge, return_tensors="pt")
        height, width = (int(v) for v in out["image_sizes"][0])
        return out["pixel_values"], (height, width)

    def placeholder(self, size: tuple[int, int]) -> str:
        """The image tokens for an image of ``size`` (H, W) pixels: one row of tokens per merged patch row."""
        step = self.patch_size * self.merge
        rows, cols = size[0] // step, size[1] // step
        tokens = ([IMAGE_TOKEN] * cols + [BREAK_TOKEN]) * rows
        tokens[-1] = END_TOKEN
        return "".join(tokens)

    def expand(self, text: str, sizes: list[tuple[int, int]]) -> str:
        """``text`` with its ``[IMG]`` placeholders (one per image, in order) replaced by the image tokens."""
        parts = text.split(IMAGE_TOKEN)
        if len(parts) - 1 != len(sizes):
            raise Flux2KitError(f"The chat text has {len(parts) - 1} image placeholders for {len(sizes)} images.")
        out = [parts[0]]
        for size, rest in zip(sizes, parts[1:]):
            out += [self.placeholder(size), rest]
        return "".join(out)


def read_image_processor_settings(folder: str) -> dict:
    """Pixtral preprocessing settings saved in a tokenizer/processor folder, or {} when there are none."""
    for name, inner in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise Flux2KitError(f"Cannot read {path} ({e}): the tokenizer folder is damaged. Download it again.") from None
        raw = raw.get(inner) if inner and isinstance(raw, dict) else raw
        if isinstance(raw, dict) and raw:
            return {k: raw[k] for k in _IMAGE_PROCESSOR_KEYS if raw.get(k) is not None}
    return {}
