"""ComfyUI's CONDITIONING as core's FLUX.2 model reads it, so the same conditioning gives the same picture.

A CONDITIONING is a list of ``[embeddings (B, L, D), extras]``. Core's FLUX.2 model (ComfyUI 0.29,
``comfy/model_base.py``: ``Flux.extra_conds`` and ``Flux2.extra_conds``) uses, per entry:

- the embeddings, left-padded with zeros to 512 tokens when shorter (longer ones are used as they are;
  no attention mask: the zero tokens are attended to), text position ids 0..L-1;
- ``guidance`` (core's FluxGuidance sets it): the embedded guidance of [dev]; 3.5 when the key is absent;
  None (FluxDisableGuidance) leaves the guidance embedding out;
- ``reference_latents`` (core's ReferenceLatent appends them): FLUX.2 latents numbered in order
  (T = 10, 20, ...), as flux2kit's references; ``reference_latents_method`` must be "index" (FLUX.2's own).

The text ``attention_mask`` and ``pooled_output`` are ignored by core's FLUX.2 model, and so here.
The engine reads this plain structure; it never imports ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import Flux2KitError
from .editing import LATENT_CHANNELS

TEXT_LENGTH = 512  # core pads shorter conditioning to this many tokens (model_base.Flux2.extra_conds)
DEFAULT_GUIDANCE = 3.5  # core's guidance when no node set one (model_base.Flux.extra_conds)
_UNSUPPORTED = {  # extras that change sampling in ways flux2kit's sampler does not do, and the core node behind them
    "area": "area conditioning (Conditioning Set Area)",
    "mask": "masked conditioning (Conditioning Set Mask)",
    "start_percent": "a timestep range (Conditioning Set Timestep Range)",
    "end_percent": "a timestep range (Conditioning Set Timestep Range)",
    "control": "a ControlNet (Apply ControlNet)",
    "gligen": "GLIGEN",
}


@dataclass
class CoreConditioning:
    """One core CONDITIONING entry, as core's FLUX.2 model sees it."""

    embeds: torch.Tensor  # (B, max(L, 512), D) float32 on the CPU, zero-padded on the left as core does
    guidance: float | None = DEFAULT_GUIDANCE  # [dev]'s embedded guidance; None: FluxDisableGuidance
    reference_latents: tuple = ()  # FLUX.2 latents (1 or B, 128, h, w), in order
    tokens: int = 0  # the length before padding

    @property
    def family(self) -> str:
        return ""  # core does not say which encoder made it; the width is checked against the transformer


def is_core_conditioning(value) -> bool:
    """True for ComfyUI's CONDITIONING (a list of [tensor, dict]) as opposed to flux2kit's own."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], torch.Tensor) and isinstance(e[1], dict)
        for e in value)


def pad_like_core(embeds: torch.Tensor) -> torch.Tensor:
    """Left zero-padding to 512 tokens, as core's FLUX.2 model pads shorter conditioning (longer stays)."""
    if embeds.shape[1] >= TEXT_LENGTH:
        return embeds
    return torch.nn.functional.pad(embeds, (0, 0, TEXT_LENGTH - embeds.shape[1], 0))


def read_core_conditioning(conditioning, *, what: str = "The conditioning") -> CoreConditioning:
    """The one entry of a core CONDITIONING, padded and checked; an error for what the sampler cannot honour."""
    if not is_core_conditioning(conditioning) or not conditioning:
        raise Flux2KitError(f"{what} is not a ComfyUI CONDITIONING (a list of [embeddings, options]); connect "
                            "FLUX.2 Text Encode or a core conditioning node.")
    if len(conditioning) > 1:
        raise Flux2KitError(
            f"{what} holds {len(conditioning)} entries (core Conditioning Combine or Concat makes such lists); FLUX.2 "
            "Sampler (flux2kit) takes one. Encode one prompt, or sample with core KSampler.")
    embeds, extras = conditioning[0]
    for key, name in _UNSUPPORTED.items():
        if extras.get(key) is not None:
            raise Flux2KitError(f"{what} carries {name}, which FLUX.2 Sampler (flux2kit) does not apply. Remove that "
                                "node, or sample with core KSampler.")
    method = extras.get("reference_latents_method")
    if method not in (None, "index"):
        raise Flux2KitError(f"{what} asks for reference latent method {method!r} (FluxKontextMultiReferenceLatent"
                            "Method); FLUX.2 numbers references with 'index'. For cached references use the "
                            "Sampler's reference_cache input instead.")
    if embeds.ndim != 3:
        raise Flux2KitError(f"{what}'s embeddings have shape {tuple(embeds.shape)}; FLUX.2 conditioning is (batch, "
                            "tokens, width).")
    refs = tuple(extras.get("reference_latents") or ())
    for number, latent in enumerate(refs, start=1):
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise Flux2KitError(f"{what}'s reference latent {number} is {shape}, not a FLUX.2 latent (batch, 128, h, "
                                "w): give Reference Latent a LATENT made with the FLUX.2 VAE.")
    guidance = extras.get("guidance", DEFAULT_GUIDANCE)
    return CoreConditioning(embeds=pad_like_core(embeds.float().cpu()),
                            guidance=None if guidance is None else float(guidance),
                            reference_latents=tuple(r.float().cpu() for r in refs), tokens=int(embeds.shape[1]))


def to_core_conditioning(embeds: torch.Tensor) -> list:
    """flux2kit's prompt embeddings as a core CONDITIONING entry (what core's text encode nodes output)."""
    return [[embeds.float().cpu(), {"pooled_output": None}]]


SAME = "same"  # the negative pass sees the positive pass's references (diffusers); core negatives carry their own


@dataclass
class SamplerConditioning:
    """What the sampler needs from its conditioning inputs, whichever kind they are."""

    embeds: torch.Tensor
    references: object = None  # References (core reference latents, then the wired references) or None
    negative_embeds: torch.Tensor | None = None
    negative_references: object = SAME
    embedded_guidance: object = SAME  # [dev]: core conditioning's own guidance; SAME: the guidance input
    prompts: tuple = ()  # the prompt texts, when known (for the "image N" check)
    core: bool = False
    notes: tuple = ()


def sampler_conditioning(transformer, positive, negative=None, *, guidance: float,
                         references=None) -> SamplerConditioning:
    """flux2kit's conditioning or core's CONDITIONING (and an optional negative of either kind) for the sampler.

    Core conditioning is read as core's FLUX.2 model reads it (see the module docstring); its reference
    latents come before the wired ``references``. A core negative keeps its own reference latents, as
    core samples each conditioning with its own.
    """
    from .references import join_references, latent_references

    notes = []
    if is_core_conditioning(positive):
        c = read_core_conditioning(positive)
        out = SamplerConditioning(c.embeds, join_references(latent_references(list(c.reference_latents)), references),
                                  embedded_guidance=c.guidance, core=True)
        if transformer.guidance_embeds and c.guidance != guidance:
            shown = "none (FluxDisableGuidance)" if c.guidance is None else f"{c.guidance:g}"
            notes.append(f"guidance {shown} from the conditioning is used, as core does (set it with FluxGuidance); "
                         "the guidance input applies to FLUX.2 Text Encode's conditioning")
    else:
        out = SamplerConditioning(positive.embeds, references, negative_embeds=getattr(positive, "negative", None),
                                  prompts=tuple(getattr(positive, "prompts", ())))
    if negative is not None:
        if is_core_conditioning(negative):
            n = read_core_conditioning(negative, what="The negative conditioning")
            out.negative_embeds = n.embeds
            out.negative_references = join_references(latent_references(list(n.reference_latents)), references)
        else:
            out.negative_embeds = negative.embeds
    uses_cfg = bool(getattr(transformer, "uses_cfg", False)) and guidance > 1.0
    if uses_cfg and out.negative_embeds is None:
        notes.append(f"{transformer.name}: no negative conditioning, so classifier-free guidance is off (one pass "
                     "per step); connect a negative (e.g. an empty prompt) to guide with scale "
                     f"{guidance:g}")
    elif negative is not None and not uses_cfg:
        notes.append("the negative conditioning is not used: only FLUX.2 [klein] base with guidance above 1 runs "
                     "classifier-free guidance")
    out.notes = tuple(notes)
    return out
