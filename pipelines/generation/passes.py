"""One model evaluation per conditioning: its text, its references, and how the transformer sees them.

A :class:`ModelPass` turns (noisy latents, timestep) into a velocity for one conditioning: the
positive pass, and for classifier-free guidance the negative one. References are appended after the
image tokens with their own position ids and cut off the output, as diffusers' FLUX.2 pipelines do.
"""

from __future__ import annotations

import torch

from ..errors import Flux2KitError
from .sampling import text_ids


def _batch(tensor: torch.Tensor, b: int) -> torch.Tensor:
    return tensor if tensor.shape[0] == b else tensor.expand(b, *tensor.shape[1:])


class ModelPass:
    """The transformer's velocity for one conditioning (text embeddings and optional references)."""

    def __init__(self, transformer, embeds: torch.Tensor, references=None, *, batch_size: int):
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
        self.ref_tokens = self.ref_ids = None
        if references is not None:
            self.ref_tokens = _batch(references.tokens.to(device, dtype), batch_size)
            self.ref_ids = _batch(references.ids.to(device), batch_size)

    def __call__(self, x: torch.Tensor, img_ids: torch.Tensor, sigma: torch.Tensor, guidance, step: int):
        """Velocity (B, N, 128) for the image tokens ``x`` at timestep ``sigma`` (step ``step`` of the run)."""
        n = x.shape[1]
        if self.ref_tokens is None:
            return self.transformer(x, img_ids, self.text, self.text_ids, sigma, guidance)
        x = torch.cat([x, self.ref_tokens], dim=1)
        ids = torch.cat([img_ids, self.ref_ids], dim=1)
        return self.transformer(x, ids, self.text, self.text_ids, sigma, guidance)[:, :n]
