"""Independent references for the LoRA tests: diffusers' own model and checkpoint converter on merged weights.

``merged_model(base, deltas)`` adds deltas (BFL layer -> delta weight, BFL row order) to a tiny model's
weights in BFL layout and converts them with diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``
into a fresh ``Flux2Transformer2DModel``: the model a correctly applied LoRA must equal, computed by
code that shares nothing with flux2kit's LoRA path.
"""

from __future__ import annotations

import copy

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

from ..pipelines.demo_models.transformer import to_bfl
from ..pipelines.generation.sampling import latent_ids, text_ids


def inputs(text_width: int = 384, seed: int = 1, h: int = 4, w: int = 6, text_len: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(1, h * w, 128, generator=g), latent_ids=latent_ids(1, h, w),
                text=torch.randn(1, text_len, text_width, generator=g), text_ids=text_ids(1, text_len),
                sigma=torch.full((1,), 0.7), guidance=torch.full((1,), 4.0))


def run(transformer, x) -> torch.Tensor:
    """Our transformer (Flux2Transformer or LoraTransformer) on fixed inputs."""
    with torch.no_grad():
        guidance = x["guidance"] if transformer.guidance_embeds else None
        return transformer(x["latents"], x["latent_ids"], x["text"], x["text_ids"], x["sigma"], guidance)


def run_diffusers(model, x) -> torch.Tensor:
    with torch.no_grad():
        guidance = x["guidance"] if model.config.guidance_embeds else None
        return model(hidden_states=x["latents"], encoder_hidden_states=x["text"], timestep=x["sigma"],
                     img_ids=x["latent_ids"], txt_ids=x["text_ids"], guidance=guidance, return_dict=False)[0]


def bfl_weights(model) -> dict[str, torch.Tensor]:
    return to_bfl({k: v.detach().float().clone() for k, v in model.state_dict().items()})


def merged_model(base, deltas: dict[str, torch.Tensor] | None = None, *, weights=None):
    """``base`` with ``deltas`` added in BFL layout, converted by diffusers; ``weights`` replaces whole BFL layers."""
    bfl = bfl_weights(base)
    for name, d in (deltas or {}).items():
        bfl[name + ".weight"] = bfl[name + ".weight"] + d.float()
    for name, w in (weights or {}).items():
        bfl[name + ".weight"] = w.float()
    model = Flux2Transformer2DModel(**base.config).eval()
    model.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(bfl))
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class DiffusersLoraHolder(Flux2LoraLoaderMixin):
    """diffusers' FLUX.2 LoRA loader on a bare transformer (the mixin Flux2Pipeline/Flux2KleinPipeline use)."""

    hf_device_map = None

    def __init__(self, transformer):
        self.transformer = transformer

    @property
    def components(self):
        return {"transformer": self.transformer}


def diffusers_with_lora(base, lora, weights=None):
    """A copy of ``base`` with diffusers' ``load_lora_weights`` of ``lora`` (a path or a state dict, or a list)."""
    model = copy.deepcopy(base)
    holder = DiffusersLoraHolder(model)
    loras = lora if isinstance(lora, list) else [lora]
    names = [f"l{i}" for i in range(len(loras))]
    for name, item in zip(names, loras):
        holder.load_lora_weights(dict(item) if isinstance(item, dict) else item, adapter_name=name)
    if weights is not None:
        model.set_adapters(names, weights=weights)
    return model
