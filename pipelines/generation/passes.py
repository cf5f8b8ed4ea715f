"""One model evaluation per conditioning: its text, its references, and how the transformer sees them.

A :class:`ModelPass` turns (noisy latents, timestep) into a velocity for one conditioning: the
positive pass, and for classifier-free guidance the negative one. References are appended after the
image tokens with their own position ids and cut off the output, as diffusers' FLUX.2 pipelines do;
with cached references (``reference_cache.py``) they come first and their K/V are reused.
"""

from __future__ import annotations

import torch

from ..errors import Flux2KitError
from ..models.reference_kv import cache_bytes, forward_cached, forward_extract
from .reference_cache import ReferencePlan, cache_key, keep, lookup
from .sampling import text_ids


def _batch(tensor: torch.Tensor, b: int) -> torch.Tensor:
    return tensor if tensor.shape[0] == b else tensor.expand(b, *tensor.shape[1:])


class ModelPass:
    """The transformer's velocity for one conditioning (text embeddings and optional references)."""

    def __init__(self, transformer, embeds: torch.Tensor, references=None, *, batch_size: int,
                 plan: ReferencePlan = ReferencePlan()):
        if embeds.shape[-1] != transformer.text_width:
            raise Flux2KitError(
                f"The prompt embeddings are {embeds.shape[-1]} wide but this transformer expects "
                f"{transformer.text_width}: the text encoder does not belong to this model. FLUX.2 [dev] needs the "
                "Mistral-Small-3 text encoder, FLUX.2 [klein] the Qwen3 encoder of its size."
            )
        device, dtype = transformer.device, transformer.dtype
        self.transformer = transformer
        self.text = _batch(embeds.to(device, dtype), batch_size)
        self.text_ids = text_ids(batch_size, self.text.shape[1]).to(device)
        self.references = references
        self.plan = plan if references is not None else ReferencePlan()
        self.ref_tokens = self.ref_ids = self.cache = self.key = None
        self.reused = False
        if references is not None:
            self.shared = references.tokens.shape[0] == 1  # one set of references for the whole batch
            self.ref_tokens = _batch(references.tokens.to(device, dtype), batch_size)
            self.ref_ids = _batch(references.ids.to(device), batch_size)
        if self.plan.kind == "kv" and self.plan.cached:  # the KV model's K/V outlive the run
            self.key = cache_key(transformer, references, self.shared)
            self.cache = lookup(transformer, self.key)
            self.reused = self.cache is not None

    @property
    def uses_kv(self) -> bool:
        return self.plan.uses_kv

    @property
    def cache_bytes(self) -> int:
        return cache_bytes(self.cache)

    def __call__(self, x: torch.Tensor, img_ids: torch.Tensor, sigma: torch.Tensor, guidance, step: int):
        """Velocity (B, N, 128) for the image tokens ``x`` at timestep ``sigma`` (step ``step`` of the run)."""
        t = self.transformer
        if self.ref_tokens is None:
            return t(x, img_ids, self.text, self.text_ids, sigma, guidance)
        if not self.plan.uses_kv:
            n = x.shape[1]
            x = torch.cat([x, self.ref_tokens], dim=1)
            ids = torch.cat([img_ids, self.ref_ids], dim=1)
            return t(x, ids, self.text, self.text_ids, sigma, guidance)[:, :n]
        if self.cache is not None:
            return forward_cached(t, x, img_ids, self.text, self.text_ids, sigma, guidance, self.cache)
        exact = self.plan.kind == "kv"
        v, cache = forward_extract(t, x, img_ids, self.text, self.text_ids, sigma, guidance, self.ref_tokens,
                                   self.ref_ids, ref_attention="self" if exact else "full",
                                   shared_refs=exact and self.shared)
        if self.plan.cached:
            self.cache = cache
            if self.key is not None:
                keep(t, self.key, cache)
        return v
