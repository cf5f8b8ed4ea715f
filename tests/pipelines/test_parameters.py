"""Sizes, ranges, seeds and the schedule, against docs/parameters.md and diffusers' own code."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as diffusers_mu
from diffusers.utils.torch_utils import randn_tensor

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.parameters import (
    ASPECT_RATIOS,
    MAX_PIXELS,
    RESOLUTIONS,
    check_generation,
    make_noise,
    resolve_size,
    size_from_aspect,
)
from flux2kit.pipelines.generation.sampling import compute_empirical_mu, get_schedule


@pytest.mark.parametrize("ratio,res,expected", [
    ("1:1", "1 MP", (1024, 1024)),
    ("16:9", "1 MP", (1360, 768)),
    ("3:2", "2 MP", (1776, 1184)),
    ("16:9", "4 MP", (2720, 1536)),
])
def test_documented_size_examples(ratio, res, expected):
    assert size_from_aspect(ratio, res) == expected


@pytest.mark.parametrize("ratio", [r for r in ASPECT_RATIOS if r != "match_input_image"])
@pytest.mark.parametrize("res", list(RESOLUTIONS))
def test_size_rule(ratio, res):
    """The rule itself, recomputed independently: rounded to 16, then shrunk to fit 4 MP."""
    a, b = (int(v) for v in ratio.split(":"))
    px = RESOLUTIONS[res] * 1024 * 1024
    w = 16 * round(math.sqrt(px * a / b) / 16)
    h = 16 * round(math.sqrt(px * b / a) / 16)
    while w * h > MAX_PIXELS:
        if w >= h:
            w -= 16
        else:
            h -= 16
    got = size_from_aspect(ratio, res)
    assert got == (w, h)
    assert got[0] % 16 == 0 and got[1] % 16 == 0 and got[0] * got[1] <= MAX_PIXELS


def test_match_input_image_uses_image_one():
    assert size_from_aspect("match_input_image", "1 MP", (1600, 900)) == size_from_aspect("16:9", "1 MP")
    with pytest.raises(Flux2KitError, match="needs a reference image"):
        size_from_aspect("match_input_image", "1 MP", None)


def test_explicit_size_overrides_and_is_validated():
    assert resolve_size("16:9", "2 MP", 512, 768) == (512, 768)
    assert resolve_size("16:9", "1 MP", 0, 0) == (1360, 768)
    with pytest.raises(Flux2KitError, match=r"multiples of 16.*nearest valid size is 1008x1024"):
        resolve_size(width=1001, height=1024)
    with pytest.raises(Flux2KitError, match=r"over the 4 MP maximum.*nearest valid size is 2880x1440"):
        resolve_size(width=2896, height=1456)  # 5 MP at about 2:1
    with pytest.raises(Flux2KitError, match="both width and height"):
        resolve_size(width=512)


def test_5mp_request_is_refused_with_a_fitting_suggestion():
    with pytest.raises(Flux2KitError) as info:
        resolve_size(width=2560, height=2048)
    w, h = (int(v) for v in str(info.value).rsplit(" ", 1)[1].rstrip(".").split("x"))
    assert w * h <= MAX_PIXELS and w % 16 == 0 and h % 16 == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_inference_steps=0), "num_inference_steps must be 1-50"),
    (dict(num_inference_steps=51), "num_inference_steps must be 1-50"),
    (dict(guidance=10.5), "guidance must be 0-10"),
    (dict(seed=-1), "seed must be 0-18446744073709551615"),
    (dict(seed=2**64), "seed must be"),
    (dict(batch_size=17), "batch_size must be 1-16"),
])
def test_generation_ranges(kwargs, message):
    args = dict(num_inference_steps=28, guidance=4.0, seed=0, batch_size=1) | kwargs
    with pytest.raises(Flux2KitError, match=message):
        check_generation(**args)


def test_noise_matches_diffusers_cpu_generator_and_batch_rule():
    ours = make_noise(42, 3, 256, 128)
    assert ours.shape == (3, 128, 8, 16) and ours.dtype == torch.float32
    for i in range(3):
        g = torch.Generator("cpu").manual_seed(42 + i)
        ref = randn_tensor((1, 128, 8, 16), generator=g, device=torch.device("cpu"), dtype=torch.float32)
        assert torch.equal(ours[i:i + 1], ref)
    assert torch.equal(make_noise(43, 1, 256, 128), ours[1:2])


def test_largest_seed_wraps_for_later_batch_items():
    noise = make_noise(2**64 - 1, 2, 64, 64)
    assert torch.equal(noise[1:2], make_noise(0, 1, 64, 64))


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 4301, 16384])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_schedule_matches_diffusers_scheduler(seq_len, steps):
    assert compute_empirical_mu(seq_len, steps) == diffusers_mu(seq_len, steps)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=diffusers_mu(seq_len, steps))
    assert torch.equal(get_schedule(steps, seq_len), sched.sigmas)


def test_schedule_at_1mp_50_steps():
    """docs/checkpoints.md: 1024x1024, 50 steps -> mu about 2.02 (ComfyUI's Flux2 default shift)."""
    assert compute_empirical_mu(4096, 50) == pytest.approx(2.02, abs=0.01)
    s = get_schedule(50, 4096)
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[:-1] > s[1:]).all())
