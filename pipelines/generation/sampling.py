"""Sampling: FLUX.2's schedule, position ids, and the flow-matching Euler loop (``denoise``)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import Flux2KitError


class Cancelled(Exception):
    """Raised by ``denoise`` when its cancel check says stop."""


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's empirical schedule shift (flux2 sampling.py): linear in tokens, interpolated in step count."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def get_schedule(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """Sigmas (num_steps + 1,) from 1 towards 0: linspace(1, 1/N, N) shifted by mu, then a final 0.

    Computed in float32 as diffusers' FlowMatchEulerDiscreteScheduler does, so both loops see the
    same numbers.
    """
    mu = compute_empirical_mu(image_seq_len, num_steps)
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    return torch.cat([sigmas, torch.zeros(1)])


def text_ids(batch_size: int, length: int) -> torch.Tensor:
    """(B, L, 4): text token l sits at (0, 0, 0, l)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(batch_size, -1, -1)


def latent_ids(batch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, h*w, 4) for a latent grid h x w: token (h, w) sits at (0, h, w, 0)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    return ids.unsqueeze(0).expand(batch_size, -1, -1)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


StepCallback = Callable[[int, int, torch.Tensor], None]


def _batch(embeds: torch.Tensor, b: int) -> torch.Tensor:
    return embeds if embeds.shape[0] == b else embeds.expand(b, -1, -1)


def denoise(
    transformer,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    num_steps: int,
    guidance: float | None,
    references=None,
    negative_embeds: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run the flow-matching Euler loop from ``noise`` (B, 128, h, w); returns latents of the same shape.

    ``prompt_embeds`` is (1 or B, L, D). ``references`` (tokens and ids) are appended after the
    image tokens and cut off the output. ``callback(step, total, denoised)`` runs after each step
    with the model's current estimate of the clean latents (B, 128, h, w), for previews;
    ``should_cancel()`` is checked before every step.

    Guidance by model: [dev] embeds ``guidance`` in the transformer; [klein] distilled ignores it;
    [klein] base runs classifier-free guidance with scale ``guidance`` against ``negative_embeds``
    (the empty prompt), as diffusers' Flux2KleinPipeline does: only when the scale is above 1, with
    a separate unconditional pass, ``uncond + scale * (cond - uncond)``.
    """
    device, dtype = transformer.device, transformer.dtype
    b, _, h, w = noise.shape
    if prompt_embeds.shape[-1] != transformer.text_width:
        raise Flux2KitError(
            f"The prompt embeddings are {prompt_embeds.shape[-1]} wide but this transformer expects {transformer.text_width}: "
            "the text encoder does not belong to this model. FLUX.2 [dev] needs the Mistral-Small-3 text encoder, "
            "FLUX.2 [klein] the Qwen3 encoder of its size."
        )
    text = _batch(prompt_embeds.to(device, dtype), b)
    cfg = bool(getattr(transformer, "uses_cfg", False)) and guidance is not None and guidance > 1.0
    negative = None
    if cfg:
        if negative_embeds is None:
            raise Flux2KitError(
                "FLUX.2 [klein] base needs the empty prompt's embeddings for classifier-free guidance; encode the "
                "prompt with the model's Qwen3 text encoder (FLUX.2 Text Encode adds them)."
            )
        negative = _batch(negative_embeds.to(device, dtype), b)
    t_ids = text_ids(b, text.shape[1]).to(device)
    neg_ids = text_ids(b, negative.shape[1]).to(device) if negative is not None else None
    img_ids = latent_ids(b, h, w).to(device)
    ref_tokens = None
    if references is not None:
        ref_tokens = references.tokens.to(device, dtype).expand(b, -1, -1)
        img_ids = torch.cat([img_ids, references.ids.to(device).expand(b, -1, -1)], dim=1)
    n_img = h * w
    sigmas = get_schedule(num_steps, n_img).to(device)
    g = None
    if guidance is not None and transformer.guidance_embeds:
        g = torch.full((b,), float(guidance), device=device, dtype=torch.float32)

    latents = pack(noise.to(device, torch.float32))
    with torch.inference_mode():
        for i in range(num_steps):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled before step {i + 1} of {num_steps}")
            x = latents.to(dtype)
            if ref_tokens is not None:
                x = torch.cat([x, ref_tokens], dim=1)
            # The model sees the timestep as the scheduler stores it: sigma * 1000, divided back.
            sigma = ((sigmas[i] * 1000.0) / 1000.0).expand(b).to(dtype)
            v = transformer(x, img_ids, text, t_ids, sigma, g)[:, :n_img]
            if negative is not None:
                v_neg = transformer(x, img_ids, negative, neg_ids, sigma, g)[:, :n_img]
                v = v_neg + guidance * (v - v_neg)
            v = v.float()
            if callback is not None:
                denoised = latents - sigmas[i] * v  # flow matching: x0 = x_t - sigma * v
            latents = latents + (sigmas[i + 1] - sigmas[i]) * v
            if callback is not None:
                callback(i + 1, num_steps, unpack(denoised, h, w))
    return unpack(latents, h, w)
