"""Cached references: which way a sampling pass attends to its references, and the cache that outlives a run.

``reference_cache`` (the nodes' input, the request's field):

- ``"auto"``: FLUX.2 [klein] 9B KV computes its references' K/V once and reuses them, within the run and
  across runs (they depend only on the model and the references: not on the prompt, seed, size or
  denoise); other models run normally.
- ``"off"``: nothing is cached. The KV model still runs as diffusers' ``Flux2KleinKVPipeline`` does
  (references first, at timestep 0, attending only to themselves), recomputing them at every step.
- ``"approximate"``: as ``"auto"``, and other models use ComfyUI's ``FluxKVCache`` approximation:
  references at timestep 0, their K/V taken from the first step's full attention and reused for the
  rest of the run (they depend on that step's noise and prompt, so they are never kept across runs).
  The picture changes: README, "Cached references", gives the measured difference.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..models.reference_kv import bytes_per_token, cache_bytes

log = logging.getLogger("flux2kit")

REFERENCE_CACHE_MODES = ("auto", "off", "approximate")
_KEPT = 2  # cross-run entries per model: the positive and a negative pass


@dataclass(frozen=True)
class ReferencePlan:
    """How a pass treats its references: "plain" (appended, full attention at the current timestep), "kv" (the KV
    model's self-attending references) or "approximate" (ComfyUI's FluxKVCache); whether K/V are cached."""

    kind: str = "plain"
    cached: bool = False

    @property
    def uses_kv(self) -> bool:
        return self.kind != "plain"


def plan_references(transformer, has_references: bool, mode: str = "auto") -> tuple[ReferencePlan, str | None]:
    """The plan for ``transformer`` and ``mode``, and a note for the user (or None)."""
    if mode not in REFERENCE_CACHE_MODES:
        from ..errors import Flux2KitError

        raise Flux2KitError(f"Unknown reference_cache {mode!r}; use one of {', '.join(REFERENCE_CACHE_MODES)}.")
    kv_model = bool(getattr(transformer, "reference_kv", False))
    if not has_references:
        note = "reference_cache: there are no references to cache; sampling runs normally." \
            if mode == "approximate" else None
        return ReferencePlan(), note
    if kv_model:
        return ReferencePlan("kv", cached=mode != "off"), None
    if mode == "approximate":
        return ReferencePlan("approximate", cached=True), (
            "reference_cache approximate: references at timestep 0, their K/V from the first step reused (ComfyUI's "
            "FluxKVCache); faster, but the picture differs from uncached sampling.")
    return ReferencePlan(), None


def estimate_bytes(transformer, num_reference_tokens: int, mode: str = "auto", batch_size: int = 1) -> int:
    """Memory a pass's reference cache will take on the transformer's device (0 when nothing is cached)."""
    plan, _ = plan_references(transformer, num_reference_tokens > 0, mode)
    if not plan.cached:
        return 0
    per_token = bytes_per_token(transformer.model, transformer.dtype)
    return per_token * num_reference_tokens * (1 if plan.kind == "kv" else batch_size)


def references_digest(references) -> str:
    """Content hash of reference tokens and ids: equal references reuse a cache whatever object carries them."""
    h = hashlib.sha256()
    for t in (references.tokens, references.ids):
        t = t.detach().to("cpu").contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _store(transformer) -> OrderedDict:
    return transformer.caches.setdefault("reference_kv", OrderedDict())


def cache_key(transformer, references, shared: bool) -> tuple:
    """Everything the KV model's reference K/V depend on: the weights (LoRAs included, through the model's
    cache_key), the references, and whether one copy serves the whole batch."""
    return (transformer.cache_key(), references_digest(references), shared)


def lookup(transformer, key: tuple):
    """A kept cache for ``key`` (now the most recent), or None."""
    store = _store(transformer)
    if key in store:
        store.move_to_end(key)
        return store[key]
    return None


def keep(transformer, key: tuple, cache) -> None:
    """Keep a cache across runs (at most two per model; the oldest goes first)."""
    store = _store(transformer)
    store[key] = cache
    store.move_to_end(key)
    while len(store) > _KEPT:
        _, old = store.popitem(last=False)
        log.info("Reference cache: dropped an older entry (%.1f MB).", cache_bytes(old) / 2**20)
