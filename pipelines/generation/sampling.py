"""Sampling: FLUX.2's schedule (truncated by ``denoise`` as ComfyUI's KSampler does), position ids, and the
flow-matching Euler loop (``denoise``), which starts from noise or from a noised start image and keeps the
unmasked area of an inpaint from the start image at every step."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..parameters import schedule_length


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


def denoise_schedule(num_steps: int, denoise: float, image_seq_len: int) -> torch.Tensor:
    """Sigmas (num_steps + 1,) for ``num_steps`` steps at strength ``denoise``, with ComfyUI KSampler's meaning.

    The schedule is FLUX.2's for int(num_steps / denoise) steps (its mu from that count), and sampling
    starts where it has ``num_steps`` steps left; denoise 1 is the plain schedule. Denoise 0 gives an empty
    schedule (nothing runs). diffusers' img2img pipelines reach the same sigmas with N = int(steps /
    denoise) and strength = (steps - 0.5) / N.
    """
    total = schedule_length(num_steps, denoise)
    if total == 0:
        return torch.zeros(0)
    return get_schedule(total, image_seq_len)[-(num_steps + 1):]


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


def denoise(
    transformer,
    noise: torch.Tensor,
    positive,
    *,
    sigmas: torch.Tensor,
    guidance: float | None,
    negative=None,
    embedded_guidance: float | None | str = "same",
    start: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run the flow-matching Euler loop over ``sigmas``; returns latents shaped like ``noise`` (B, 128, h, w).

    ``positive`` (and ``negative``, for classifier-free guidance) are :class:`~.passes.ModelPass`es:
    one conditioning each, with its references. Without ``start`` the loop starts from ``noise``;
    with it (clean latents, 1 or B) from ``sigmas[0] * noise + (1 - sigmas[0]) * start``, as diffusers'
    ``scale_noise`` and ComfyUI's ``noise_scaling`` do. ``mask`` (1 or B, 1, h, w; 1 = repaint) keeps the
    rest from ``start``: after each step it is reset to ``start`` noised to the next sigma with the same
    noise (exactly ``start`` after the last step), as diffusers' FLUX.2 inpaint pipeline does.

    ``callback(step, total, denoised)`` runs after each step with the model's current estimate of the
    clean latents, for previews; ``should_cancel()`` is checked before every step. With ``negative``
    the velocity is ``uncond + guidance * (cond - uncond)`` ([klein] base, as diffusers does). [dev] embeds
    ``embedded_guidance`` (by default ``guidance``; None leaves the guidance embedding out, as core ComfyUI's
    FluxDisableGuidance does).
    """
    device = transformer.device
    b, _, h, w = noise.shape
    num_steps = len(sigmas) - 1
    sigmas = sigmas.to(device)
    embedded = guidance if embedded_guidance == "same" else embedded_guidance
    g = None
    if embedded is not None and transformer.guidance_embeds:
        g = torch.full((b,), float(embedded), device=device, dtype=torch.float32)
    img_ids = latent_ids(b, h, w).to(device)

    noise = pack(noise.to(device, torch.float32))
    clean = pack(start.to(device, torch.float32)).expand(b, -1, -1) if start is not None else None
    keep = pack(mask.to(device, torch.float32)).expand(b, -1, -1) if mask is not None else None
    latents = noise if clean is None else sigmas[0] * noise + (1.0 - sigmas[0]) * clean
    with torch.inference_mode():
        for i in range(num_steps):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled before step {i + 1} of {num_steps}")
            # The model sees the timestep as the scheduler stores it: sigma * 1000, divided back.
            sigma = ((sigmas[i] * 1000.0) / 1000.0).expand(b).to(transformer.dtype)
            x = latents.to(transformer.dtype)
            v = positive(x, img_ids, sigma, g, i)
            if negative is not None:
                v_neg = negative(x, img_ids, sigma, g, i)
                v = v_neg + guidance * (v - v_neg)
            v = v.float()
            if callback is not None:
                denoised = latents - sigmas[i] * v  # flow matching: x0 = x_t - sigma * v
            latents = latents + (sigmas[i + 1] - sigmas[i]) * v
            if keep is not None:
                last = i == num_steps - 1
                kept = clean if last else sigmas[i + 1] * noise + (1.0 - sigmas[i + 1]) * clean
                latents = (1 - keep) * kept + keep * latents
            if callback is not None:
                callback(i + 1, num_steps, unpack(denoised, h, w))
    return unpack(latents, h, w)
