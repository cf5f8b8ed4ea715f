"""Independent references for prompt upsampling: diffusers' ``Flux2Pipeline.upsample_prompt`` and transformers'
``PixtralProcessor``, on the tiny Mistral 3 model.

- ``reference_processor`` is transformers' own ``PixtralProcessor`` with the PIL-backend image processor
  (``PixtralImageProcessorPil``), built from the model's config as the real tokenizer folder describes it.
  transformers 5 guards the processor module with torchvision (its import pulls in the torchvision image
  processor for one helper the processor never calls while processing); where torchvision is missing the
  module is imported once with that helper taken from the PIL module, then ``sys.modules`` is restored.
- ``diffusers_upsample`` runs diffusers' ``Flux2Pipeline.upsample_prompt`` unbound on the four attributes
  it reads, after ``torch.manual_seed(seed)``. diffusers fixes ``max_new_tokens=512``, which takes minutes
  on a random 32-layer model that never ends its text; ``max_new_tokens`` shortens it through a thin wrapper
  around the same model's ``generate`` (every other argument is diffusers'). Sampling draws the same random
  numbers per token whatever the limit, so the text is the prefix of the 512-token one.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch

_PIXTRAL = "transformers.models.pixtral"


def pixtral_processor_class():
    """transformers' ``PixtralProcessor`` class, with or without torchvision."""
    try:
        return importlib.import_module(f"{_PIXTRAL}.processing_pixtral").PixtralProcessor
    except ImportError:
        pass
    pil = importlib.import_module(f"{_PIXTRAL}.image_processing_pil_pixtral")
    stub = types.ModuleType(f"{_PIXTRAL}.image_processing_pixtral")
    stub.get_resize_output_image_size = pil.get_resize_output_image_size
    saved = {name: sys.modules.get(name) for name in (stub.__name__, f"{_PIXTRAL}.processing_pixtral")}
    sys.modules[stub.__name__] = stub
    try:
        sys.modules.pop(f"{_PIXTRAL}.processing_pixtral", None)
        return importlib.import_module(f"{_PIXTRAL}.processing_pixtral").PixtralProcessor
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def reference_processor(tokenizer, config):
    """transformers' PixtralProcessor for a Mistral3 ``config`` (PIL image backend, the tokenizer's template)."""
    from transformers import PixtralImageProcessorPil

    vision = config.vision_config
    image_processor = PixtralImageProcessorPil(patch_size=vision.patch_size, size={"longest_edge": vision.image_size})
    return pixtral_processor_class()(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                                     spatial_merge_size=config.spatial_merge_size, chat_template=tokenizer.chat_template)


class _Limited:
    """The model, with diffusers' hard-coded max_new_tokens=512 replaced by ``limit``."""

    def __init__(self, model, limit: int):
        self.model, self.limit = model, limit
        self.device, self.dtype = model.device, model.dtype

    def generate(self, **kwargs):
        kwargs["max_new_tokens"] = self.limit
        return self.model.generate(**kwargs)


def diffusers_upsample(model, tokenizer, prompt: str, images=None, *, temperature: float, seed: int,
                       max_new_tokens: int = 512) -> str:
    """diffusers' ``Flux2Pipeline.upsample_prompt(prompt, images, temperature)`` after ``torch.manual_seed(seed)``.

    ``tokenizer`` is what diffusers' pipeline holds as ``tokenizer``: a processor for images, or the tokenizer.
    """
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    from diffusers.pipelines.flux2.pipeline_flux2 import UPSAMPLING_MAX_IMAGE_SIZE

    if not hasattr(tokenizer, "tokenizer"):  # diffusers decodes with tokenizer.tokenizer (the processor's)
        tokenizer = types.SimpleNamespace(apply_chat_template=tokenizer.apply_chat_template, tokenizer=tokenizer)
    pipe = types.SimpleNamespace(
        text_encoder=model if max_new_tokens == 512 else _Limited(model, max_new_tokens), tokenizer=tokenizer,
        image_processor=Flux2ImageProcessor(vae_scale_factor=16), upsampling_max_image_size=UPSAMPLING_MAX_IMAGE_SIZE)
    torch.manual_seed(seed)
    with torch.no_grad():
        return Flux2Pipeline.upsample_prompt(pipe, prompt, images=images, temperature=temperature)[0]
