"""FLUX.2 [dev]'s Mistral text encoder: exact agreement with diffusers' Flux2Pipeline prompt
encoding, every folder and key layout, lean loading (only the first 30 layers are built or read),
truncation reporting, release, and helpful refusals of folders that are not FLUX.2 [dev]'s encoder.

The reference is the full Mistral3ForConditionalGeneration (32 text layers, vision tower, LM head)
loaded by transformers from the same bf16 files, upcast to fp32 like ours.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import weakref

import pytest
import torch
from diffusers import Flux2Pipeline
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as DIFFUSERS_SYSTEM_MESSAGE
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

from flux2kit.pipelines.files import safetensors as safetensors_io
from flux2kit.pipelines.errors import Flux2KitError, UnsupportedFormatError
from flux2kit.pipelines.models.text_encoder import SYSTEM_MESSAGE, Flux2TextEncoder, PromptEmbeds, load_text_encoder
from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3

# fp32 on both sides from the same bf16-rounded weights; batching changes matmul blocking only.
ATOL = 1e-5

PROMPTS = [
    "A red fox sitting in a snowy forest at dawn, soft golden light",
    "東京の夜景、ネオン 🦊 — café naïve «ünïcödé»",
    "",
    " ".join(["a red fox in a snowy forest at dawn with soft golden light"] * 70),  # > 512 tokens
]
SHORT, UNICODE, EMPTY, LONG = PROMPTS


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_mistral3(seed=0)


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory):
    """A diffusers-style FLUX.2 root: text_encoder/ (transformers-5 keys) + tokenizer/."""
    folder = str(tmp_path_factory.mktemp("flux2_root"))
    save_tiny_mistral3(*tiny, folder, layout="pipeline")
    return folder


@pytest.fixture(scope="module")
def reference(root):
    """diffusers' own prompt embeddings for all PROMPTS, from the full transformers model."""
    model = Mistral3ForConditionalGeneration.from_pretrained(
        os.path.join(root, "text_encoder"), dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    with torch.no_grad():
        embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(model, tokenizer, PROMPTS)
    return embeds, tokenizer


@pytest.fixture(scope="module")
def encoder(root):
    return load_text_encoder(root)


def _independent_count(tokenizer, prompt: str) -> int:
    # Mistral's chat format written out by hand, tokenised without the template machinery.
    text = f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{prompt}[/INST]"
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# Parity with diffusers


def test_system_message_is_bfl_s():
    assert SYSTEM_MESSAGE == DIFFUSERS_SYSTEM_MESSAGE


def test_encoder_attributes(encoder):
    assert isinstance(encoder, Flux2TextEncoder)
    assert encoder.hidden_layers == (10, 20, 30)
    assert encoder.max_length == 512
    assert encoder.embed_dim == 3 * 128 == 384
    assert encoder.dtype == torch.float32
    assert encoder.device == torch.device("cpu")


def test_short_prompt_matches_diffusers(encoder, reference):
    ref, tokenizer = reference
    out = encoder.encode(SHORT)
    assert isinstance(out, PromptEmbeds)
    assert out.embeds.shape == (1, 512, 384) and out.embeds.dtype == torch.float32
    assert out.prompts == [SHORT]
    assert out.truncated == [False]
    assert out.token_counts == [_independent_count(tokenizer, SHORT)]
    assert encoder.count_tokens(SHORT) == out.token_counts[0]
    diff = (out.embeds - ref[0:1]).abs().max().item()
    assert diff <= ATOL, diff
    # The three stacked states really differ (layer 10, 20, 30 are not one state repeated).
    h10, h20, h30 = out.embeds[0, :5].split(128, dim=-1)
    assert not torch.allclose(h10, h20) and not torch.allclose(h20, h30)


def test_batch_with_unicode_and_empty_prompt_matches_diffusers(encoder, reference):
    ref, tokenizer = reference
    out = encoder.encode([UNICODE, EMPTY])
    assert out.embeds.shape == (2, 512, 384)
    assert out.truncated == [False, False]
    assert out.token_counts == [_independent_count(tokenizer, UNICODE), _independent_count(tokenizer, EMPTY)]
    assert out.token_counts[1] > 0  # the system message and markup are there even for an empty prompt
    diff = (out.embeds - ref[1:3]).abs().max().item()
    assert diff <= ATOL, diff


def test_long_prompt_is_truncated_like_diffusers_and_reported(encoder, reference, caplog):
    ref, tokenizer = reference
    expected = _independent_count(tokenizer, LONG)
    assert expected > 600
    with caplog.at_level(logging.WARNING, logger="flux2kit"):
        out = encoder.encode(LONG)
    assert out.truncated == [True]
    assert out.token_counts == [expected]
    diff = (out.embeds - ref[3:4]).abs().max().item()
    assert diff <= ATOL, diff
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "flux2kit"]
    assert len(warnings) == 1
    assert f"{expected} tokens" in warnings[0] and f"{expected - 512} tokens" in warnings[0]
    assert "dropped" in warnings[0]


def test_no_warning_for_short_prompts_and_output_dtype(encoder, reference, caplog):
    ref, _ = reference
    with caplog.at_level(logging.WARNING, logger="flux2kit"):
        out = encoder.encode([SHORT], dtype=torch.bfloat16)
    assert not [r for r in caplog.records if r.name == "flux2kit"]
    assert out.embeds.dtype == torch.bfloat16
    torch.testing.assert_close(out.embeds.float(), ref[0:1], atol=1e-2, rtol=1e-2)


def test_encode_refuses_empty_batch(encoder):
    with pytest.raises(Flux2KitError, match="No prompt"):
        encoder.encode([])


# --------------------------------------------------------------------------------------------
# Folder and key layouts


def _copy_tokenizer(src_root: str, dst: str) -> None:
    shutil.copytree(os.path.join(src_root, "tokenizer"), dst, dirs_exist_ok=True)


def _variant(tiny, tmp, name: str) -> str:
    """A folder in one real-world layout; returns the path a user would pass."""
    model, tokenizer = tiny
    folder = os.path.join(tmp, name)
    if name == "old_keys":  # language_model.model.layers.N... (saved before transformers 4.52)
        save_tiny_mistral3(model, tokenizer, folder, layout="pipeline", key_layout="old")
        return folder
    if name == "flat":
        return save_tiny_mistral3(model, tokenizer, folder, layout="flat")
    if name == "flat_old_keys_sharded":
        return save_tiny_mistral3(model, tokenizer, folder, layout="flat", key_layout="old", max_shard_bytes=1 << 20)
    if name == "text_encoder_subfolder":  # the user points at text_encoder/, tokenizer/ is its sibling
        save_tiny_mistral3(model, tokenizer, folder, layout="pipeline")
        return os.path.join(folder, "text_encoder")
    if name == "pruned_30_layers":  # a pruned Mistral3: config says 30 layers, weights stop there
        model_dir = save_tiny_mistral3(model, tokenizer, folder, layout="flat")
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        keep = {k: v for k, v in state.items() if not any(f"layers.{i}." in k for i in (30, 31))}
        save_file(keep, os.path.join(model_dir, "model.safetensors"))
        cfg_path = os.path.join(model_dir, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["text_config"]["num_hidden_layers"] = 30
        json.dump(cfg, open(cfg_path, "w"))
        return model_dir
    if name == "text_only_mistral":  # MistralForCausalLM: model.layers.N..., lm_head.weight
        os.makedirs(folder)
        model.config.text_config.save_pretrained(folder)
        state = {
            k.replace("model.language_model.", "model."): v.to(torch.bfloat16).contiguous()
            for k, v in model.state_dict().items()
            if k.startswith(("model.language_model.", "lm_head."))
        }
        save_file(state, os.path.join(folder, "model.safetensors"))
        tokenizer.save_pretrained(folder)
        return folder
    raise AssertionError(name)


@pytest.mark.parametrize(
    "layout",
    ["old_keys", "flat", "flat_old_keys_sharded", "text_encoder_subfolder", "pruned_30_layers", "text_only_mistral"],
)
def test_every_layout_loads_the_same_encoder(layout, tiny, encoder, tmp_path):
    path = _variant(tiny, str(tmp_path), layout)
    other = load_text_encoder(path)
    ours = encoder.model.state_dict()
    theirs = other.model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # Same tokenizer found: same ids for the same chat.
    messages = [{"role": "user", "content": [{"type": "text", "text": UNICODE}]}]
    assert other.tokenizer.apply_chat_template(messages, return_dict=False) == encoder.tokenizer.apply_chat_template(
        messages, return_dict=False
    )
    assert other.count_tokens(LONG) == encoder.count_tokens(LONG)


def test_old_keys_are_really_old(tiny, tmp_path):
    path = _variant(tiny, str(tmp_path), "old_keys")
    keys = safetensors_io.read_header(os.path.join(path, "text_encoder", "model.safetensors")).tensors
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "language_model.model.embed_tokens.weight" in keys
    assert "language_model.lm_head.weight" in keys
    assert "vision_tower.transformer.layers.0.attention.q_proj.weight" in keys
    assert not any(k.startswith("model.") for k in keys)


# --------------------------------------------------------------------------------------------
# Lean loading


def test_only_the_first_30_layers_are_built_and_read(root, monkeypatch):
    read: list[str] = []
    original_get = safetensors_io.TensorFile.get

    def recording_get(self, key):
        read.append(key)
        return original_get(self, key)

    monkeypatch.setattr(safetensors_io.TensorFile, "get", recording_get)
    enc = load_text_encoder(root)

    # Nothing but the embedding and layers 0-29 was read from disk.
    assert read, "no tensor was read"
    for key in read:
        assert key.startswith("model.language_model."), key
        assert "vision" not in key and "projector" not in key and "lm_head" not in key
        assert key != "model.language_model.norm.weight"
        if ".layers." in key:
            assert int(key.split(".layers.")[1].split(".")[0]) < 30, key

    # The model holds exactly that: 30 layers, no vision tower, projector, LM head or final norm.
    model = enc.model
    assert len(model.layers) == 30
    assert isinstance(model.norm, torch.nn.Identity)
    names = [n for n, _ in model.named_modules()]
    assert not any(("vision" in n or "projector" in n or "lm_head" in n) for n in names)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())

    full = Mistral3ForConditionalGeneration.from_pretrained(os.path.join(root, "text_encoder")).model.language_model
    kept_layers = sum(p.numel() for layer in full.layers[:30] for p in layer.parameters())
    expected = full.embed_tokens.weight.numel() + kept_layers
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    assert len(read) == len(list(model.parameters()))


def test_release_frees_weights_and_later_encode_errors(root):
    enc = load_text_encoder(root)
    ref = weakref.ref(enc.model.embed_tokens.weight)
    enc.to("cpu")
    enc.release()
    gc.collect()
    assert ref() is None, "the weights are still referenced after release()"
    assert enc.model is None
    with pytest.raises(Flux2KitError, match="released"):
        enc.encode(SHORT)
    assert enc.count_tokens(SHORT) > 0  # the tokenizer stays: counting is still possible
    assert enc.to("cpu") is enc
    enc.release()  # idempotent


# --------------------------------------------------------------------------------------------
# Refusals with helpful messages


def _write_config(folder: str, config: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def test_missing_folder(tmp_path):
    with pytest.raises(Flux2KitError, match="not found"):
        load_text_encoder(str(tmp_path / "nope"))


def test_single_file_is_refused_with_what_to_pass(root):
    with pytest.raises(Flux2KitError, match="single file.*folder"):
        load_text_encoder(os.path.join(root, "text_encoder", "model.safetensors"))


def test_folder_without_config(tmp_path):
    with pytest.raises(Flux2KitError, match="No config.json"):
        load_text_encoder(str(tmp_path))


def test_folder_without_tokenizer_names_where_it_looked(root, tmp_path):
    lone = tmp_path / "somewhere" / "text_encoder"
    shutil.copytree(os.path.join(root, "text_encoder"), lone)
    with pytest.raises(Flux2KitError) as info:
        load_text_encoder(str(lone))
    message = str(info.value)
    assert "No tokenizer found" in message
    assert str(lone) in message and str(tmp_path / "somewhere" / "tokenizer") in message


def test_tokenizer_without_chat_template(root, tmp_path):
    shutil.copytree(root, tmp_path / "r")
    os.remove(tmp_path / "r" / "tokenizer" / "chat_template.jinja")
    with pytest.raises(Flux2KitError, match="no chat template"):
        load_text_encoder(str(tmp_path / "r"))


def test_other_qwen_models_are_not_klein_encoders(tmp_path):
    # Qwen3 itself loads (tests/pipelines/test_klein.py); other Qwen generations are named and refused.
    _write_config(
        str(tmp_path),
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2048, "num_hidden_layers": 36},
    )
    with pytest.raises(Flux2KitError, match=r"Qwen2ForCausalLM.*\[klein\] uses a dense Qwen3"):
        load_text_encoder(str(tmp_path))


@pytest.mark.parametrize("model_type,arch", [("t5", "T5EncoderModel"), ("clip_text_model", "CLIPTextModel")])
def test_flux1_encoders_say_dev_needs_mistral(tmp_path, model_type, arch):
    _write_config(str(tmp_path), {"architectures": [arch], "model_type": model_type})
    with pytest.raises(Flux2KitError, match=r"needs Mistral-Small-3\.x") as info:
        load_text_encoder(str(tmp_path))
    assert arch in str(info.value)


def test_too_few_layers(tiny, tmp_path):
    cfg = tiny[0].config.to_dict()
    cfg["text_config"]["num_hidden_layers"] = 24
    _write_config(str(tmp_path), cfg)
    with pytest.raises(Flux2KitError, match="24 layers.*at least 30"):
        load_text_encoder(str(tmp_path))


def test_pickle_only_folder(root, tmp_path):
    shutil.copy(os.path.join(root, "text_encoder", "config.json"), tmp_path / "config.json")
    _copy_tokenizer(root, str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UnsupportedFormatError, match="pickle.*safetensors"):
        load_text_encoder(str(tmp_path))


def _rewritten(root: str, dst, edit) -> str:
    shutil.copytree(root, dst)
    path = os.path.join(dst, "text_encoder", "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return str(dst)


def test_quantized_extra_tensors_are_refused(root, tmp_path):
    def add_scale(state):
        state["model.language_model.layers.3.mlp.down_proj.weight_scale"] = torch.ones(())

    with pytest.raises(UnsupportedFormatError, match="weight_scale"):
        load_text_encoder(_rewritten(root, tmp_path / "q", add_scale))


def test_missing_layer_tensors_are_reported(root, tmp_path):
    def drop_layer_29(state):
        for key in [k for k in state if ".layers.29." in k]:
            del state[key]

    with pytest.raises(Flux2KitError, match="lack .*layers.29"):
        load_text_encoder(_rewritten(root, tmp_path / "m", drop_layer_29))


def test_weights_of_another_model_are_refused(root, tmp_path):
    def rename_everything(state):
        for key in list(state):
            state["foo." + key.replace("embed_tokens", "wte")] = state.pop(key)

    with pytest.raises(Flux2KitError, match="does not hold a Mistral language model"):
        load_text_encoder(_rewritten(root, tmp_path / "x", rename_everything))


def test_shape_mismatch_between_config_and_weights(root, tmp_path):
    def shrink(state):
        key = "model.language_model.layers.0.mlp.up_proj.weight"
        state[key] = state[key][:10].contiguous()

    with pytest.raises(Flux2KitError, match="shape .*different models"):
        load_text_encoder(_rewritten(root, tmp_path / "s", shrink))
