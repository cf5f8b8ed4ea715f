"""ComfyUI single-file text encoders (pipelines/text_encoder_files.py) on the tiny Mistral and Qwen3.

The reference is the Hugging Face folder of the same weights, loaded by the folder loader: bf16
single files must give exactly its embeddings; FP8 files those of the same model with its decoder
linears replaced by their dequantized FP8 values.
"""

import contextlib
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.files.fp8 import dequantize_weight
from flux2kit.pipelines.models.fp8_linear import fp8_linears
from flux2kit.pipelines.files.quantize import quantize_tensor
from flux2kit.pipelines.files.safetensors import read_header
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.files.quantize import save_text_encoder_file
from flux2kit.pipelines.files.text_encoder_checkpoint import TEKKEN_KEY, inspect_text_encoder_file
from flux2kit.pipelines.files.tokenizers import tekken_from_tokenizer, tokenizer_from_tekken
from flux2kit.pipelines.demo_models.comfy_text_encoders import save_tiny_mistral3_comfy, save_tiny_qwen3_comfy

PROMPTS = ["A red fox sitting in a snowy forest at dawn", "café 123 — it's 🦊 #02eb3c"]


def dequantized_copy(hf_encoder):
    """The folder-loaded encoder with every decoder linear replaced by its per-tensor FP8 round trip."""
    ref = copy.deepcopy(hf_encoder)
    with torch.no_grad():
        for name, module in ref.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                w, s = quantize_tensor(module.weight)
                module.weight.copy_(dequantize_weight(w, s, module.weight.dtype))
    return ref


# --- Mistral ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3

    model, tok = build_tiny_mistral3(seed=1)
    root = tmp_path_factory.mktemp("mistral_files")
    save_tiny_mistral3(model, tok, str(root / "hf"), layout="pipeline")
    paths = {"hf": str(root / "hf")}
    paths["bf16"] = save_tiny_mistral3_comfy(model, tok, str(root / "mistral_3_small_flux2_bf16.safetensors"))
    paths["fp8"] = save_tiny_mistral3_comfy(model, tok, str(root / "mistral_3_small_flux2_fp8.safetensors"), fp8=True)
    paths["pruned"] = save_tiny_mistral3_comfy(model, tok, str(root / "pruned.safetensors"), num_layers=30)
    paths["no_tekken"] = save_tiny_mistral3_comfy(model, tok, str(root / "no_tekken.safetensors"), tekken=False)
    return model, tok, paths


@pytest.fixture(scope="module")
def mistral_ref(mistral):
    enc = load_text_encoder(mistral[2]["hf"])
    return enc, enc.encode(PROMPTS).embeds


def test_mistral_file_has_comfyui_names_and_the_tokenizer_inside(mistral):
    header = read_header(mistral[2]["bf16"])
    keys = set(header.tensors)
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.31.mlp.down_proj.weight",
            "model.norm.weight", TEKKEN_KEY} <= keys
    assert all(k.startswith("model.") or k == TEKKEN_KEY for k in keys)
    assert header.tensors[TEKKEN_KEY].dtype == "U8"
    assert header.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "BF16"


@pytest.mark.parametrize("name", ["bf16", "pruned"])
def test_mistral_bf16_file_gives_the_hf_embeddings(name, mistral, mistral_ref):
    enc = load_text_encoder(mistral[2][name])
    assert enc.family == "mistral" and enc.hidden_layers == (10, 20, 30)
    assert torch.equal(enc.encode(PROMPTS).embeds, mistral_ref[1])


def test_the_generic_loader_dispatches_single_files(mistral, mistral_ref):
    assert torch.equal(load_text_encoder(mistral[2]["bf16"]).encode(PROMPTS).embeds, mistral_ref[1])


def test_mistral_fp8_file_gives_the_dequantized_embeddings(mistral, mistral_ref):
    enc = load_text_encoder(mistral[2]["fp8"])
    layers = fp8_linears(enc.model)
    assert len(layers) == 7 * 30 and all(l.weight.dtype == torch.float8_e4m3fn for l in layers)
    expected = dequantized_copy(mistral_ref[0]).encode(PROMPTS).embeds
    torch.testing.assert_close(enc.encode(PROMPTS).embeds, expected, rtol=1e-5, atol=1e-5)
    # and FP8 is not a no-op: the file really holds other numbers than the bf16 weights
    assert not torch.allclose(expected, mistral_ref[1], rtol=1e-3, atol=1e-3)


def test_fp8_file_dequantized_on_load(mistral):
    stored = load_text_encoder(mistral[2]["fp8"])
    dense = load_text_encoder(mistral[2]["fp8"], weights="dequantize")
    assert fp8_linears(dense.model) == []
    torch.testing.assert_close(dense.encode(PROMPTS).embeds, stored.encode(PROMPTS).embeds, rtol=1e-5, atol=1e-5)


def test_quantize_on_load_of_a_bf16_file_equals_the_fp8_file(mistral):
    a = load_text_encoder(mistral[2]["bf16"], weights="quantize")
    b = load_text_encoder(mistral[2]["fp8"])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = (sa[k].view(torch.uint8), sb[k].view(torch.uint8)) if sa[k].element_size() == 1 else (sa[k], sb[k])
        assert sa[k].dtype == sb[k].dtype and torch.equal(x, y), k


def test_inspect_reads_config_and_quantization(mistral):
    info = inspect_text_encoder_file(mistral[2]["fp8"])
    c = info.config
    assert (info.family, info.quantization, c.num_hidden_layers, c.hidden_size, c.head_dim) == \
        ("mistral", "comfy-fp8", 32, 128, 32)
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)
    assert "layers.0.self_attn.q_proj" in info.layers and "embed_tokens" not in info.layers
    info.files.close()


# --- the tekken tokenizer ---------------------------------------------------------------------------

def test_tekken_tokenizer_gives_the_hf_token_ids(mistral):
    from flux2kit.pipelines.demo_models.text_encoder import CORPUS as _CORPUS

    _, tok, paths = mistral
    tekken = tokenizer_from_tekken(load_file(paths["bf16"])[TEKKEN_KEY])
    texts = _CORPUS + PROMPTS + ["Numbers 1234567 and it's   spaced\n\nlines", "[INST]x[/INST] <s>"]
    for text in texts:
        assert tekken(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(tekken) == len(tok)
    for special in ("<s>", "</s>", "<pad>", "[INST]", "[SYSTEM_PROMPT]", "[IMG]"):
        assert tekken.convert_tokens_to_ids(special) == tok.convert_tokens_to_ids(special)
    messages = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in PROMPTS]
    assert tekken.apply_chat_template(messages, tokenize=True) == tok.apply_chat_template(messages, tokenize=True)


def test_tekken_conversion_agrees_with_transformers_converter(mistral, tmp_path):
    try:
        from transformers.integrations.mistral.tokenizer import MistralConverter
    except ImportError:
        pytest.skip("this transformers has no file-based MistralConverter")
    data = load_file(mistral[2]["bf16"])[TEKKEN_KEY].numpy().tobytes()
    (tmp_path / "tekken.json").write_bytes(data)
    theirs = MistralConverter(str(tmp_path / "tekken.json")).converted()
    ours = tokenizer_from_tekken(data).backend_tokenizer
    assert ours.get_vocab() == theirs.get_vocab()
    for text in PROMPTS + ["hello world 42"]:
        assert ours.encode(text).ids == theirs.encode(text).ids


def test_tekken_round_trip_is_stable(mistral):
    data = tekken_from_tokenizer(mistral[1])
    assert tekken_from_tokenizer(tokenizer_from_tekken(data)) == data
    raw = json.loads(data)
    assert raw["config"]["default_vocab_size"] == len(mistral[1])
    assert [s["token_str"] for s in raw["special_tokens"][:3]] == ["<unk>", "<s>", "</s>"]


def test_damaged_tekken_is_reported(mistral, tmp_path):
    sd = load_file(mistral[2]["bf16"])
    sd[TEKKEN_KEY] = torch.tensor(list(b"not json"), dtype=torch.uint8)
    path = tmp_path / "damaged.safetensors"
    save_file(sd, path, metadata=read_header(mistral[2]["bf16"]).metadata)
    with pytest.raises(Flux2KitError, match="tekken.*damaged"):
        load_text_encoder(path)


def test_mistral_file_without_tekken_asks_for_a_tokenizer_folder(mistral, mistral_ref):
    with pytest.raises(Flux2KitError, match=r"single file.*no tokenizer.*tokenizer/ folder of FLUX.2 \[dev\]"):
        load_text_encoder(mistral[2]["no_tekken"])
    enc = load_text_encoder(mistral[2]["no_tekken"], tokenizer=os.path.join(mistral[2]["hf"], "tokenizer"))
    assert torch.equal(enc.encode(PROMPTS).embeds, mistral_ref[1])


def test_save_from_hf_folder_writes_the_tekken_and_same_weights(mistral, mistral_ref, tmp_path):
    out = save_text_encoder_file(mistral[2]["hf"], tmp_path / "from_hf.safetensors", quantize=False)
    assert TEKKEN_KEY in read_header(out).tensors
    assert torch.equal(load_text_encoder(out).encode(PROMPTS).embeds, mistral_ref[1])


def test_real_mistral_defaults_without_flux2kit_metadata(tmp_path):
    """A file as ComfyUI ships it (no config metadata): head_dim 128 and Mistral-Small's RoPE theta."""
    from transformers import MistralConfig, MistralForCausalLM

    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=30,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ref = load_text_encoder(str(folder)).encode(PROMPTS).embeds
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k.startswith("model.")}
    sd[TEKKEN_KEY] = torch.frombuffer(bytearray(tekken_from_tokenizer(tok)), dtype=torch.uint8)
    save_file(sd, tmp_path / "comfy.safetensors")  # no metadata, like ComfyUI's files
    info = inspect_text_encoder_file(tmp_path / "comfy.safetensors")
    assert (info.config.head_dim, info.config.num_attention_heads, info.config.rope_parameters["rope_theta"]) == \
        (128, 2, 1e9)
    info.files.close()
    assert torch.equal(load_text_encoder(tmp_path / "comfy.safetensors").encode(PROMPTS).embeds, ref)


# --- Qwen3 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3

    model, tok = build_tiny_qwen3(seed=2)
    root = tmp_path_factory.mktemp("qwen_files")
    save_tiny_qwen3(model, tok, str(root / "hf"), layout="pipeline")
    paths = {"hf": str(root / "hf"), "tokenizer": str(root / "hf" / "tokenizer")}
    paths["bf16"] = save_tiny_qwen3_comfy(model, str(root / "qwen_3_4b.safetensors"))
    paths["fp8"] = save_tiny_qwen3_comfy(model, str(root / "qwen_3_4b_fp8_scaled.safetensors"), fp8=True)
    return model, tok, paths


@pytest.fixture(scope="module")
def qwen_ref(qwen):
    enc = load_text_encoder(qwen[2]["hf"])
    return enc, enc.encode(PROMPTS).embeds


def test_qwen3_file_has_comfyui_names_and_no_tokenizer(qwen):
    keys = set(read_header(qwen[2]["bf16"]).tensors)
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight", "model.layers.27.mlp.up_proj.weight"} <= keys
    assert TEKKEN_KEY not in keys and all(k.startswith("model.") for k in keys)


def test_qwen3_bf16_file_gives_the_hf_embeddings(qwen, qwen_ref):
    enc = load_text_encoder(qwen[2]["bf16"], tokenizer=qwen[2]["tokenizer"])
    assert enc.family == "qwen3" and enc.hidden_layers == (9, 18, 27)
    assert torch.equal(enc.encode(PROMPTS).embeds, qwen_ref[1])


def test_qwen3_fp8_file_gives_the_dequantized_embeddings(qwen, qwen_ref):
    enc = load_text_encoder(qwen[2]["fp8"], tokenizer=qwen[2]["tokenizer"])
    assert len(fp8_linears(enc.model)) == 7 * 27
    expected = dequantized_copy(qwen_ref[0]).encode(PROMPTS).embeds
    torch.testing.assert_close(enc.encode(PROMPTS).embeds, expected, rtol=1e-5, atol=1e-5)


def test_qwen3_quantize_on_load_equals_the_fp8_file(qwen):
    a = load_text_encoder(qwen[2]["bf16"], tokenizer=qwen[2]["tokenizer"], weights="quantize")
    b = load_text_encoder(qwen[2]["fp8"], tokenizer=qwen[2]["tokenizer"])
    assert torch.equal(a.encode(PROMPTS).embeds, b.encode(PROMPTS).embeds)


def test_qwen3_file_without_tokenizer_says_what_to_pass(qwen):
    with pytest.raises(Flux2KitError, match=r"qwen_3_4b.safetensors.*Qwen3.*no tokenizer.*qwen25_tokenizer.*tokenizer="):
        load_text_encoder(qwen[2]["bf16"])


def test_tokenizer_of_another_model_is_refused(qwen, mistral):
    # Qwen3's tokenizer (998 tokens) for the Mistral encoder (1000 rows): it fits, but lacks Mistral's chat tokens
    with pytest.raises(Flux2KitError, match=r"does not match the text encoder.*lacks \[INST\].*different models"):
        load_text_encoder(mistral[2]["no_tekken"], tokenizer=qwen[2]["tokenizer"])


def test_folder_with_another_models_tokenizer_is_refused(qwen, mistral, tmp_path):
    """A Hugging Face folder whose tokenizer/ is another model's: smaller than the embedding table, so only
    the chat tokens tell (the single-file loader checked them; the folder loader did not)."""
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(mistral[2]["hf"], folder, ignore=shutil.ignore_patterns("tokenizer"))
    shutil.copytree(qwen[2]["tokenizer"], folder / "tokenizer")
    with pytest.raises(Flux2KitError, match=r"does not match the text encoder.*lacks \[INST\].*different models"):
        load_text_encoder(str(folder))


def test_tokenizer_larger_than_the_embedding_is_refused(qwen, mistral):
    # Mistral's tiny tokenizer (1000 tokens) for the tiny Qwen3 (998 embedding rows)
    with pytest.raises(Flux2KitError, match="1000 tokens but the text encoder in qwen_3_4b.safetensors embeds only 998"):
        load_text_encoder(qwen[2]["bf16"], tokenizer=os.path.join(mistral[2]["hf"], "tokenizer"))


def test_old_chat_template_is_replaced_by_qwen3s(qwen, qwen_ref, tmp_path):
    """ComfyUI's qwen25_tokenizer has Qwen3's vocabulary but Qwen2.5's template (no thinking switch)."""
    tok = copy.deepcopy(qwen[1])
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    tok.save_pretrained(tmp_path / "old")
    enc = load_text_encoder(qwen[2]["bf16"], tokenizer=str(tmp_path / "old"))
    assert torch.equal(enc.encode(PROMPTS).embeds, qwen_ref[1])


# --- other bad input --------------------------------------------------------------------------------

def test_transformer_in_the_text_encoder_slot(transformer_files):
    with pytest.raises(Flux2KitError, match="FLUX transformer, not a FLUX.2 text encoder.*transformer loader"):
        load_text_encoder(transformer_files["comfy-fp8"])


def test_too_few_layers(mistral, tmp_path):
    sd = load_file(mistral[2]["bf16"])
    sd = {k: v for k, v in sd.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= 20)}
    save_file(sd, tmp_path / "short.safetensors", metadata=read_header(mistral[2]["bf16"]).metadata)
    with pytest.raises(Flux2KitError, match="holds 20 layers.*needs at least 30"):
        load_text_encoder(tmp_path / "short.safetensors")


def test_incomplete_file_names_a_missing_tensor(mistral, tmp_path):
    sd = load_file(mistral[2]["bf16"])
    del sd["model.layers.5.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "broken.safetensors", metadata=read_header(mistral[2]["bf16"]).metadata)
    with pytest.raises(Flux2KitError, match="incomplete.*layers.5.mlp.up_proj"):
        load_text_encoder(tmp_path / "broken.safetensors")


@contextlib.contextmanager
def _models_built():
    """Weak references to every MistralModel built inside the block."""
    import weakref

    import transformers

    refs, real = [], transformers.MistralModel.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        refs.append(weakref.ref(self))

    transformers.MistralModel.__init__ = spy
    try:
        yield refs
    finally:
        transformers.MistralModel.__init__ = real


def test_failed_load_leaves_no_model_alive(mistral, tmp_path):
    import gc

    sd = load_file(mistral[2]["bf16"])
    del sd["model.layers.29.mlp.up_proj.weight"]  # fails after every other tensor was loaded
    save_file(sd, tmp_path / "broken.safetensors", metadata=read_header(mistral[2]["bf16"]).metadata)
    with _models_built() as refs, pytest.raises(Flux2KitError) as info:
        load_text_encoder(tmp_path / "broken.safetensors")
    del info
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_failed_folder_load_frees_the_model_while_the_error_is_kept(mistral, tmp_path):
    """ComfyUI keeps a failed node's exception: its traceback must not hold the half-loaded model."""
    import gc
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(mistral[2]["hf"], folder)
    weights = folder / "text_encoder" / "model.safetensors"
    sd = {k: v for k, v in load_file(weights).items() if not k.endswith("layers.29.mlp.up_proj.weight")}
    save_file(sd, weights)
    with _models_built() as refs, pytest.raises(Flux2KitError, match="lack 1 tensors") as info:
        load_text_encoder(str(folder))
    gc.collect()
    assert info.value is not None  # the error is still held, as ComfyUI holds it
    assert refs and all(r() is None for r in refs)


@pytest.mark.parametrize("flavor", ["header", "scaled_fp8", "uint8"])
def test_other_comfyui_fp8_flavors_load_the_same(flavor, mistral, tmp_path):
    """ComfyUI's other FP8 spellings: the layer list in the header only, the legacy scaled_fp8, FP8 bytes as uint8."""
    sd = load_file(mistral[2]["fp8"])
    metadata = dict(read_header(mistral[2]["fp8"]).metadata)
    layers = [k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")]
    for layer in layers:
        del sd[f"{layer}.comfy_quant"]
        if flavor == "scaled_fp8":
            sd[f"{layer}.scale_weight"] = sd.pop(f"{layer}.weight_scale").reshape(1)
            sd[f"{layer}.scale_input"] = torch.ones(1)
        if flavor == "uint8":
            sd[f"{layer}.weight"] = sd[f"{layer}.weight"].view(torch.uint8)
    if flavor == "scaled_fp8":
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        del metadata["_quantization_metadata"]
    path = tmp_path / f"{flavor}.safetensors"
    save_file(sd, path, metadata=metadata)
    expected = load_text_encoder(mistral[2]["fp8"]).encode(PROMPTS).embeds
    enc = load_text_encoder(path)
    assert len(fp8_linears(enc.model)) == 7 * 30
    assert torch.equal(enc.encode(PROMPTS).embeds, expected)
