"""The README's Python example runs as written (on the tiny demo models, at a small size)."""

from __future__ import annotations

import os
import re

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python_example() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_example_runs_on_the_demo_models(tmp_path):
    from flux2kit.pipelines.demo_models import DEMO_FILES, build_demo_models

    paths = build_demo_models(str(tmp_path / "models"))
    code = _python_example()
    # The example names the real files and a GPU; here: the demo files, the CPU, a small image, 2 steps.
    for kind, real in (("transformer", "models/diffusion_models/flux2_dev_fp8mixed.safetensors"),
                       ("text_encoder", "models/text_encoders/mistral_3_small_flux2_fp8.safetensors"),
                       ("vae", "models/vae/flux2-vae.safetensors")):
        assert real in code, f"the README example no longer names {real}"
        code = code.replace(real, paths[kind])
    assert DEMO_FILES and 'device="cuda"' in code
    code = code.replace('device="cuda"', 'device="cpu"')
    code = code.replace('aspect_ratio="16:9", seed=7)', 'aspect_ratio="16:9", seed=7, width=256, height=144, '
                        'num_inference_steps=2)')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    images = scope["images"]
    assert images.shape == (1, 144, 256, 3) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
