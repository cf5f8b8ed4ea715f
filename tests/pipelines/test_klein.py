"""FLUX.2 [klein] in the engine: Qwen3 text encoders, variant and distilled/base detection, and parity with
diffusers' Flux2KleinPipeline (distilled and base) on tiny weights loaded from our formats.

The [klein] nodes: tests/nodes/test_klein_nodes.py; ``flux2kit generate`` on [klein]: tests/cli/test_generate_klein.py."""

import json
import logging
import os
import struct

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

from flux2kit.pipelines.files.transformer_checkpoint import detect_variant, inspect_transformer
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.generation.request import check_text_encoder_fits
from flux2kit.pipelines.generation.generate import generate
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
from flux2kit.pipelines.demo_models.transformer import (
    build_tiny_klein,
    fp8_reference,
    save_transformer,
    tiny_transformer_config,
)
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.models.vae import load_vae
from flux2kit.testing.pictures import picture  # the same test pictures as the [dev] parity tests




REFERENCE_SETS = {0: [], 1: [picture(160, 96, 1)]}

# fp32 on both sides; differences come only from summation order (our fused q|k|v matmul).
TOLERANCE = 2e-5  # max abs difference of [0, 1] pixel values
PROMPT = "a red fox in fresh snow, morning light"


# ---------------------------------------------------------------------------------------------
# Fixtures: the tiny [klein] (klein, qwen3, klein_files) are in tests/conftest.py


@pytest.fixture(scope="module")
def vae(tiny_vae):
    return load_vae(tiny_vae[1], device="cpu")


@pytest.fixture(scope="module")
def text_encoder(qwen3):
    return load_text_encoder(qwen3[2], device="cpu")


def _pipe(transformer, qwen3, tiny_vae, distilled):
    model, tokenizer, _ = qwen3
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    p = Flux2KleinPipeline(scheduler=scheduler, vae=tiny_vae[0], text_encoder=model, tokenizer=tokenizer,
                           transformer=transformer, is_distilled=distilled)
    p.set_progress_bar_config(disable=True)
    return p


# ---------------------------------------------------------------------------------------------
# Text encoder


@pytest.mark.parametrize("layout", ["pipeline", "model"])
def test_qwen3_embeddings_equal_diffusers(qwen3, layout, tmp_path):
    model, tokenizer, _ = qwen3
    save_tiny_qwen3(model, tokenizer, str(tmp_path), layout=layout)
    te = load_text_encoder(str(tmp_path), device="cpu")
    assert te.family == "qwen3" and te.hidden_layers == (9, 18, 27) and te.embed_dim == 3 * 64
    prompts = [PROMPT, "", "東京の夜景 🦊 " * 3]
    ours = te.encode(prompts).embeds
    ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(model, tokenizer, prompts, dtype=torch.float32)
    assert ours.shape == ref.shape == (3, 512, 192)
    diff = (ours - ref).abs().max().item()
    print(f"qwen3 {layout}: embeddings max abs diff {diff:.2e}")
    assert diff == 0.0
    # Not vacuous: the prompts differ, and the empty prompt's embeddings are cached as the negative.
    assert (ours[0] - ours[1]).abs().max() > 1e-3
    assert torch.equal(te.negative_embeds().embeds[0], ours[1])
    assert te.negative_embeds() is te.negative_embeds()


def test_qwen3_token_count_and_truncation(text_encoder, qwen3, caplog):
    tokenizer = qwen3[1]
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text_encoder.count_tokens(PROMPT) == len(tokenizer(text)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="flux2kit"):
        out = text_encoder.encode("snow " * 600)
    assert out.truncated == [True] and "dropped" in caplog.text


def test_qwen3_with_too_few_layers_says_what_klein_reads(tmp_path):
    model, tokenizer = build_tiny_qwen3(seed=0, num_layers=28)
    save_tiny_qwen3(model, tokenizer, str(tmp_path), layout="model")
    with open(tmp_path / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    config.update(num_hidden_layers=20, layer_types=config["layer_types"][:20])
    with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f)
    with pytest.raises(Flux2KitError, match=r"20 layers.*\[klein\].*9, 18, 27.*Qwen3-4B"):
        load_text_encoder(str(tmp_path))


def test_tokenizer_larger_than_the_vocabulary_is_refused(qwen3, tmp_path):
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_tokenizer

    model, _, _ = qwen3
    save_tiny_qwen3(model, build_tiny_tokenizer(vocab_size=2000), str(tmp_path), layout="model")
    with pytest.raises(Flux2KitError, match=r"tokenizer has \d+ tokens but the text encoder .* embeds only"):
        load_text_encoder(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Transformer: variant from shapes, distilled/base from metadata or the setting


def _header_only_file(path, shapes: dict[str, tuple], metadata=None):
    """A valid safetensors file with these bf16 tensor shapes whose data is a sparse hole (costs no disk)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod().item())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _real_shaped_bfl(path, heads, text, double, single, guidance):
    """The header of a BFL-layout FLUX.2 transformer with real widths (heads x 128), data left sparse."""
    d, mlp = heads * 128, 3 * heads * 128
    s = {"img_in.weight": (d, 128), "txt_in.weight": (d, text), "time_in.in_layer.weight": (d, 256),
         "time_in.out_layer.weight": (d, d), "double_stream_modulation_img.lin.weight": (6 * d, d),
         "double_stream_modulation_txt.lin.weight": (6 * d, d), "single_stream_modulation.lin.weight": (3 * d, d),
         "final_layer.linear.weight": (128, d), "final_layer.adaLN_modulation.1.weight": (2 * d, d)}
    if guidance:
        s.update({"guidance_in.in_layer.weight": (d, 256), "guidance_in.out_layer.weight": (d, d)})
    for i in range(double):
        for st in ("img", "txt"):
            s.update({f"double_blocks.{i}.{st}_attn.qkv.weight": (3 * d, d),
                      f"double_blocks.{i}.{st}_attn.proj.weight": (d, d),
                      f"double_blocks.{i}.{st}_attn.norm.query_norm.scale": (128,),
                      f"double_blocks.{i}.{st}_attn.norm.key_norm.scale": (128,),
                      f"double_blocks.{i}.{st}_mlp.0.weight": (2 * mlp, d),
                      f"double_blocks.{i}.{st}_mlp.2.weight": (d, mlp)})
    for i in range(single):
        s.update({f"single_blocks.{i}.linear1.weight": (3 * d + 2 * mlp, d),
                  f"single_blocks.{i}.linear2.weight": (d, d + mlp),
                  f"single_blocks.{i}.norm.query_norm.scale": (128,),
                  f"single_blocks.{i}.norm.key_norm.scale": (128,)})
    return _header_only_file(path, {"model.diffusion_model." + k: v for k, v in s.items()})


@pytest.mark.parametrize("heads,text,double,single,guidance,variant", [
    (48, 15360, 8, 48, True, "dev"),
    (24, 7680, 5, 20, False, "klein-4b"),
    (32, 12288, 8, 24, False, "klein-9b"),
])
def test_variant_from_real_shapes(tmp_path, heads, text, double, single, guidance, variant):
    path = _real_shaped_bfl(str(tmp_path / "t.safetensors"), heads, text, double, single, guidance)
    ckpt = inspect_transformer(path)
    try:
        assert ckpt.variant == variant
        assert (ckpt.config["num_layers"], ckpt.config["num_single_layers"]) == (double, single)
        assert ckpt.family == ("dev" if guidance else "klein")
        assert ckpt.distilled is None  # real BFL files say nothing; the loader setting decides
    finally:
        ckpt.files.close()


def test_variant_of_tiny_configs():
    assert detect_variant(tiny_transformer_config()) == "custom"
    assert detect_variant(tiny_transformer_config(guidance_embeds=False)) == "custom"
    # A [klein] width with a guidance embedding is no released model.
    assert detect_variant(tiny_transformer_config(num_attention_heads=24, joint_attention_dim=7680)) == "custom"
    assert detect_variant(tiny_transformer_config(num_attention_heads=24, joint_attention_dim=7680,
                                                  guidance_embeds=False)) == "klein-4b"


@pytest.mark.parametrize("layout", ["bfl", "comfy-fp8", "diffusers"])
@pytest.mark.parametrize("flag", [True, False])
def test_distilled_or_base_from_the_file(klein_files, layout, flag):
    t = load_transformer(klein_files[layout, flag], device="cpu")
    assert t.family == "klein" and t.distilled is flag and t.uses_cfg is (not flag)
    assert ("distilled" if flag else "base") in t.checkpoint and ("distilled" if flag else "base") in t.name


def test_diffusers_transformer_subfolder_reads_model_index_of_its_pipeline(klein_files):
    t = load_transformer(os.path.join(klein_files["diffusers", False], "transformer"), device="cpu")
    assert t.distilled is False


@pytest.mark.parametrize("layout", ["bfl", "comfy-fp8", "diffusers"])
def test_unknown_klein_needs_the_setting(klein_files, layout):
    path = klein_files[layout, None]
    with pytest.raises(Flux2KitError, match=r"\[klein\].*does not say.*Pick klein_mode 'distilled' or 'base'"):
        load_transformer(path, device="cpu")
    assert load_transformer(path, device="cpu", klein_mode="distilled").distilled is True
    assert load_transformer(path, device="cpu", klein_mode="base").distilled is False


def test_setting_overrides_the_file_with_a_warning(klein_files, caplog):
    with caplog.at_level(logging.WARNING, logger="flux2kit"):
        t = load_transformer(klein_files["bfl", True], device="cpu", klein_mode="base")
    assert t.distilled is False
    assert "says it is the distilled [klein] model" in caplog.text and "running it as base" in caplog.text


def test_dev_ignores_klein_mode(transformer_files):
    t = load_transformer(transformer_files["bfl"], device="cpu", klein_mode="base")
    assert t.family == "dev" and t.distilled is None and not t.uses_cfg


def test_unknown_klein_mode_value(klein_files):
    with pytest.raises(Flux2KitError, match="Unknown klein_mode 'turbo'"):
        load_transformer(klein_files["bfl", True], device="cpu", klein_mode="turbo")


# ---------------------------------------------------------------------------------------------
# Parity with diffusers' Flux2KleinPipeline


@pytest.fixture(scope="module")
def klein_pair(klein_files):
    """source -> (ours distilled, ours base) for the BFL file, the ComfyUI FP8 file and the diffusers folder."""
    out = {}
    for layout in ("bfl", "comfy-fp8", "diffusers"):
        out[layout] = (load_transformer(klein_files[layout, None], device="cpu", klein_mode="distilled"),
                       load_transformer(klein_files[layout, None], device="cpu", klein_mode="base"))
    return out


@pytest.mark.parametrize("source", ["bfl", "comfy-fp8", "diffusers"])
@pytest.mark.parametrize("distilled", [True, False], ids=["distilled", "base"])
@pytest.mark.parametrize("n_refs", [0, 1])
def test_matches_diffusers_flux2kleinpipeline(source, distilled, n_refs, klein, klein_pair, qwen3, tiny_vae,
                                              text_encoder, vae):
    refs = REFERENCE_SETS[n_refs]
    reference_model = fp8_reference(klein) if source == "comfy-fp8" else klein
    pipe = _pipe(reference_model, qwen3, tiny_vae, distilled)
    ours_t = klein_pair[source][0 if distilled else 1]
    width, height, steps, seed, guidance = 128, 96, 3, 1234, 4.0
    expected = pipe(prompt=PROMPT, image=refs or None, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="pt").images.permute(0, 2, 3, 1)
    ours = generate(ours_t, text_encoder, vae, prompt=PROMPT, images=refs, width=width, height=height,
                    num_inference_steps=steps, guidance=guidance, seed=seed)
    diff = (ours - expected).abs().max().item()
    print(f"klein {source} {'distilled' if distilled else 'base'} refs={n_refs}: max abs diff {diff:.2e}")
    assert diff < TOLERANCE, diff
    # Not vacuous: the other mode (guidance on/off) gives another image.
    other = generate(klein_pair[source][1 if distilled else 0], text_encoder, vae, prompt=PROMPT, images=refs,
                     width=width, height=height, num_inference_steps=steps, guidance=guidance, seed=seed)
    assert (other - expected).abs().max().item() > 100 * TOLERANCE


def test_base_with_two_references_and_guidance_scale(klein, klein_pair, qwen3, tiny_vae, text_encoder, vae):
    refs = [picture(80, 64, 2), picture(64, 96, 5)]
    pipe = _pipe(klein, qwen3, tiny_vae, distilled=False)
    kw = dict(height=64, width=64, num_inference_steps=2)
    for guidance in (2.5, 1.0):  # 1.0: diffusers turns guidance off; so do we
        expected = pipe(prompt="the fox from image 1", image=refs, guidance_scale=guidance,
                        generator=torch.Generator("cpu").manual_seed(5), output_type="pt", **kw).images
        ours = generate(klein_pair["bfl"][1], text_encoder, vae, prompt="the fox from image 1", images=refs,
                        guidance=guidance, seed=5, **kw)
        diff = (ours - expected.permute(0, 2, 3, 1)).abs().max().item()
        print(f"klein bfl base refs=2 guidance={guidance}: max abs diff {diff:.2e}")
        assert diff < TOLERANCE, diff


def check_distilled_ignores_guidance_and_says_so_once(klein_files, text_encoder, vae, caplog, tmp_path):
    """The note is said once per model, remembered for the whole process: the model is loaded here from its own
    copy of the file, a source no other test has run, so the note is this test's to see."""
    import shutil

    path = shutil.copy(klein_files["bfl", None], tmp_path / "klein-distilled-own-copy.safetensors")
    t = load_transformer(path, device="cpu", klein_mode="distilled")
    kw = dict(prompt="a lighthouse", width=64, height=64, num_inference_steps=2, seed=3)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flux2kit"):
        a = generate(t, text_encoder, vae, guidance=1.0, **kw)
        b = generate(t, text_encoder, vae, guidance=7.0, **kw)
    assert torch.equal(a, b)
    notes = [r.getMessage() for r in caplog.records if "guidance input" in r.getMessage()]
    assert len(notes) == 1, notes
    assert "is distilled: it runs without guidance, so the guidance input (1) is ignored" in notes[0]


def test_distilled_ignores_guidance_and_says_so_once(klein_files, text_encoder, vae, caplog, tmp_path):
    check_distilled_ignores_guidance_and_says_so_once(klein_files, text_encoder, vae, caplog, tmp_path)


@pytest.mark.parametrize("mutation", ["never says it", "says it every time"])
def test_said_once_check_catches_zero_and_two_notes(mutation, klein_files, text_encoder, vae, caplog, tmp_path,
                                                    monkeypatch):
    """Mutations: the note never given (the old check, ``count <= 1``, accepted that), and the memory forgotten."""
    import importlib

    generate_module = importlib.import_module("flux2kit.pipelines.generation.generate")
    if mutation == "never says it":
        monkeypatch.setattr(generate_module, "_note_guidance_once", lambda transformer, guidance: None)
    else:
        class Forgetful(set):
            def add(self, item):
                pass

        monkeypatch.setattr(generate_module, "_guidance_notes", Forgetful())
    with pytest.raises(AssertionError, match=r"assert [02] == 1"):
        check_distilled_ignores_guidance_and_says_so_once(klein_files, text_encoder, vae, caplog, tmp_path)


# ---------------------------------------------------------------------------------------------
# Mismatched text encoders


def test_qwen3_encoder_with_dev_transformer(transformer_files, text_encoder, vae):
    dev = load_transformer(transformer_files["bfl"], device="cpu")
    with pytest.raises(Flux2KitError, match=r"Qwen3 text encoder.*\[klein\].*FLUX\.2 \[dev\].*Load .*Mistral"):
        generate(dev, text_encoder, vae, prompt="x", width=64, height=64, num_inference_steps=1)


def test_mistral_encoder_with_klein_transformer(klein_pair, tiny_text_encoder, vae):
    mistral = load_text_encoder(tiny_text_encoder[2], device="cpu")
    with pytest.raises(Flux2KitError, match=r"Mistral-Small-3 text encoder.*\[dev\].*\[klein\].*Load a Qwen3"):
        generate(klein_pair["bfl"][0], mistral, vae, prompt="x", width=64, height=64, num_inference_steps=1)


def test_klein_4b_encoder_with_9b_transformer(tmp_path):
    class Fake:  # only the attributes the check reads: a [klein] 9B transformer
        variant, family, text_width, name = "klein-9b", "klein", 12288, "FLUX.2 [klein] 9B distilled"

    with pytest.raises(Flux2KitError, match=r"7680-wide embeddings \(Qwen3-4B.*\[klein\] 4B\) but the transformer expects 12288.*Qwen3-8B"):
        check_text_encoder_fits(Fake(), 7680, "qwen3")


def test_tiny_9b_like_transformer_with_4b_like_encoder(text_encoder, vae):
    t9 = build_tiny_klein(seed=1, size="9b")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = save_transformer(t9, os.path.join(d, "k9.safetensors"), "bfl", is_distilled=True)
        loaded = load_transformer(path, device="cpu")
    with pytest.raises(Flux2KitError, match=r"192-wide embeddings but the transformer expects 288 \(FLUX\.2 \[klein\] distilled\).*Qwen3"):
        generate(loaded, text_encoder, vae, prompt="x", width=64, height=64, num_inference_steps=1)


def test_klein_defaults_and_reference_warning_follow_parameters_md(caplog):
    from flux2kit.pipelines.generation.request import warn_reference_count
    from flux2kit.pipelines.parameters import defaults_for

    assert defaults_for("klein", distilled=True)["num_inference_steps"] == 4
    assert defaults_for("klein", distilled=False) == {"num_inference_steps": 50, "guidance": 4.0}
    assert defaults_for("dev") == {"num_inference_steps": 28, "guidance": 4.0}
    assert warn_reference_count(4, "klein") is None
    assert "FLUX.2 [klein] is tuned for at most 4" in warn_reference_count(5, "klein-9b")
    assert warn_reference_count(5, "dev") is None
