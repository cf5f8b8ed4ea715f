"""GGUF text encoders: tiny Mistral-Small-3 (llama / mistral3 architecture, Q/K rows permuted as llama.cpp does) and
Qwen3 written in llama.cpp's layout, against the Hugging Face model holding the file's dequantized weights (run
through diffusers' own FLUX.2 prompt-embedding code), and against transformers' own GGUF loader."""

import os

import gguf
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from flux2kit.pipelines.demo_models.gguf import dequantized_text_model, save_tiny_text_encoder_gguf
from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3
from flux2kit.pipelines.errors import Flux2KitError, UnsupportedFormatError
from flux2kit.pipelines.files import gguf_text_encoder
from flux2kit.pipelines.files.gguf import GGUFFile
from flux2kit.pipelines.files.text_encoder_checkpoint import inspect_text_encoder
from flux2kit.pipelines.models.fp8_linear import fp8_linears
from flux2kit.pipelines.models.gguf_linear import GGUFEmbedding, GGUFLinear, gguf_layers
from flux2kit.pipelines.models.text_encoder import format_messages, load_text_encoder, qwen3_chat_texts

PROMPTS = ["a red fox in fresh snow, morning light", "Un chat noir 🦊 sur un toit, [INST] café"]
EXACT = 1e-5  # max abs difference / max abs value: the same fp32 weights on both sides (measured 0)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def mistral_reference(model, tokenizer, prompts=PROMPTS):
    return Flux2Pipeline._get_mistral_3_small_prompt_embeds(model, tokenizer, prompts, dtype=torch.float32,
                                                            device="cpu")


def qwen3_reference(model, tokenizer, prompts=PROMPTS):
    return Flux2KleinPipeline._get_qwen3_prompt_embeds(model, tokenizer, prompts, dtype=torch.float32)


@pytest.fixture(scope="module")
def mistral():
    """The tiny Mistral3 of the demo set (hidden size 128)."""
    return build_tiny_mistral3(seed=0)


@pytest.fixture(scope="module")
def mistral256():
    """A tiny Mistral3 with hidden size 256, so its q/k/v/gate/up rows take 256-value K-quant blocks."""
    return build_tiny_mistral3(seed=0, hidden_size=256)


@pytest.fixture(scope="module")
def qwen3():
    return build_tiny_qwen3(seed=1)


@pytest.fixture(scope="module")
def files(mistral, mistral256, qwen3, tmp_path_factory):
    """name -> (path, family, reference model holding the file's dequantized weights, its tokenizer)."""
    root = tmp_path_factory.mktemp("gguf_text")
    out = {}
    for arch, t in [("llama", "Q8_0"), ("mistral3", "Q8_0"), ("llama", "Q4_K"), ("mistral3", "Q6_K"),
                    ("qwen3", "Q8_0"), ("qwen3", "Q5_1"), ("qwen3", "BF16")]:
        model, tok = qwen3 if arch == "qwen3" else mistral256 if t.endswith("_K") else mistral
        path = str(root / f"{arch}-{t}.gguf")
        reference = save_tiny_text_encoder_gguf(model, tok, path, arch=arch, ggml_type=t, seed=5)
        out[f"{arch}-{t}"] = (path, "qwen3" if arch == "qwen3" else "mistral", dequantized_text_model(model, reference),
                              tok)
    return out


@pytest.mark.parametrize("name", ["llama-Q8_0", "mistral3-Q8_0", "llama-Q4_K", "mistral3-Q6_K", "qwen3-Q8_0",
                                  "qwen3-Q5_1", "qwen3-BF16"])
def test_embeddings_equal_the_dequantized_model(name, files):
    path, family, reference, tok = files[name]
    te = load_text_encoder(path, dtype=torch.float32)
    assert te.family == family
    ours = te.encode(PROMPTS).embeds
    expected = qwen3_reference(reference, tok) if family == "qwen3" else mistral_reference(reference, tok)
    print(f"{name}: max relative difference {rel(ours, expected):.1e}")
    assert ours.shape == expected.shape and rel(ours, expected) <= EXACT
    other = te.encode(["something else entirely"] * 2).embeds
    assert rel(other, expected) > 1e-2  # not vacuous


@pytest.mark.parametrize("name", ["llama-Q8_0", "mistral3-Q8_0"])
def test_the_un_permutation_is_what_makes_them_equal(name, files, monkeypatch):
    """Negative control: reading the permuted Q/K rows as they are gives other embeddings."""
    path, _, reference, tok = files[name]
    monkeypatch.setattr(gguf_text_encoder, "PERMUTED_ARCHS", ())
    wrong = load_text_encoder(path, dtype=torch.float32).encode(PROMPTS).embeds
    assert rel(wrong, mistral_reference(reference, tok)) > 1e-3


def test_transformers_gguf_loader_agrees(files):
    """transformers reads llama-architecture GGUFs itself (dequantizing and un-permuting): same embeddings."""
    from transformers import AutoModelForCausalLM

    path, _, _, tok = files["llama-Q8_0"]
    theirs = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  torch_dtype=torch.float32).eval()
    ours = load_text_encoder(path, dtype=torch.float32).encode(PROMPTS).embeds
    assert rel(ours, mistral_reference(theirs, tok)) <= EXACT


@pytest.mark.parametrize("name", ["mistral3-Q8_0", "qwen3-Q8_0"])
def test_the_files_vocabulary_tokenizes_like_the_original(name, files):
    path, family, _, original = files[name]
    tok = load_text_encoder(path).tokenizer
    assert len(tok) == len(original) and tok.pad_token == original.pad_token
    texts = PROMPTS + ["", "  spaces  and\nnewlines\t", "数字 12345 and émojis 👩‍👩‍👧"]
    if family == "qwen3":
        assert qwen3_chat_texts(tok, texts) == qwen3_chat_texts(original, texts)
        assert tok(qwen3_chat_texts(tok, texts))["input_ids"] == original(qwen3_chat_texts(original, texts))["input_ids"]
    else:
        kw = dict(add_generation_prompt=False, tokenize=True, return_dict=True)
        assert (tok.apply_chat_template(format_messages(texts), **kw)["input_ids"]
                == original.apply_chat_template(format_messages(texts), **kw)["input_ids"])


def test_only_the_read_layers_load_and_stay_packed(files):  # the hidden-256 model: K-quant rows
    path, _, _, _ = files["llama-Q4_K"]
    te = load_text_encoder(path, dtype=torch.float32)
    assert len(te.model.layers) == 30  # of 32: hidden state 30 is the last FLUX.2 reads
    assert isinstance(te.model.embed_tokens, GGUFEmbedding) and te.model.embed_tokens.ggml_type.name == "Q4_K"
    attn = te.model.layers[0].self_attn
    assert isinstance(attn.q_proj, GGUFLinear) and attn.q_proj.ggml_type.name == "Q4_K"
    assert isinstance(attn.o_proj, GGUFLinear) and attn.o_proj.ggml_type.name == "F16"  # 128-wide rows: no K blocks
    f = GGUFFile(path)
    kept = [t for name, t in f.tensors.items() if len(t.shape) == 2 and
            (name == "token_embd.weight" or int(name.split(".")[1]) < 30)]
    assert sum(m.weight.numel() for m in gguf_layers(te.model)) == sum(t.nbytes for t in kept)
    ckpt = inspect_text_encoder(path)
    assert ckpt.description.startswith("Mistral-Small-3.x text encoder, GGUF file, Q4_K x")
    ckpt.files.close()


def test_a_whole_gguf_upsamples_prompts_like_diffusers_on_the_dequantized_model(mistral, tmp_path):
    """A llama.cpp GGUF of the whole model (LM head as ``output.weight``) loads for text-only prompt upsampling: its
    layers and head stay packed, it encodes bit for bit like the trimmed GGUF encoder, and its upsampled text equals
    diffusers' ``upsample_prompt`` on the model holding the file's dequantized weights."""
    from flux2kit.pipelines.models.full_text_encoder import load_full_text_encoder
    from flux2kit.pipelines.prompting.upsample import upsample_prompt
    from flux2kit.testing.upsampling import diffusers_upsample

    model, tok = mistral
    path = str(tmp_path / "mistral-whole-Q8_0.gguf")
    values = save_tiny_text_encoder_gguf(model, tok, path, arch="llama", ggml_type="Q8_0", seed=7, head=True)
    reference = dequantized_text_model(model, values)
    assert torch.equal(reference.lm_head.weight, values["lm_head.weight"])
    whole = load_full_text_encoder(path, dtype=torch.float32)
    assert whole.parts == "full-text" and "text-only prompt upsampling" in whole.notes[0]  # the vision tower is mmproj's
    head = whole.generator.lm_head
    assert isinstance(head, GGUFLinear) and head.ggml_type.name == "Q8_0"
    assert len(whole.generator.model.layers) == 32 and isinstance(whole.generator.model.layers[31].mlp.up_proj, GGUFLinear)
    assert torch.equal(whole.encode(PROMPTS).embeds, load_text_encoder(path, dtype=torch.float32).encode(PROMPTS).embeds)
    expected = diffusers_upsample(reference, tok, PROMPTS[0], temperature=0.7, seed=5, max_new_tokens=6)
    ours = upsample_prompt(whole, PROMPTS[0], temperature=0.7, seed=5, max_new_tokens=6)
    assert ours.text == expected and ours.new_tokens == 6
    expanded = load_full_text_encoder(path, dtype=torch.float32, weights="dequantize", vision=False)
    assert not gguf_layers(expanded.generator)
    assert upsample_prompt(expanded, PROMPTS[0], temperature=0.7, seed=5, max_new_tokens=6).text == expected


def test_a_gguf_without_vocabulary_needs_a_tokenizer_folder(mistral, qwen3, tmp_path):
    model, tok = qwen3
    path = str(tmp_path / "Qwen3-4B-Q8_0.gguf")
    reference = dequantized_text_model(model, save_tiny_text_encoder_gguf(model, tok, path, arch="qwen3", vocab=False))
    with pytest.raises(Flux2KitError, match=r"Qwen3-4B-Q8_0.gguf is a GGUF Qwen3 text encoder \(FLUX.2 \[klein\]\) "
                                            r"without its tokenizer: its metadata has no tokenizer.ggml.tokens.*"
                                            r"Pass a tokenizer folder \(tokenizer=... / --tokenizer\)"):
        load_text_encoder(path)
    folder = save_tiny_qwen3(model, tok, str(tmp_path / "qwen3"), layout="model")
    te = load_text_encoder(path, tokenizer=folder)
    assert rel(te.encode(PROMPTS).embeds, qwen3_reference(reference, tok)) <= EXACT
    mpath = str(tmp_path / "mistral-novocab.gguf")
    save_tiny_text_encoder_gguf(*mistral, mpath, arch="mistral3", vocab=False)
    with pytest.raises(Flux2KitError, match="GGUF Mistral-Small-3.x text encoder .*tokenizer/ folder of the FLUX.2 "
                                            r"\[dev\] repository"):
        load_text_encoder(mpath)
    folder = str(tmp_path / "mistral")
    save_tiny_mistral3(*mistral, folder, layout="flat")
    assert load_text_encoder(mpath, tokenizer=folder).family == "mistral"


def test_a_text_encoder_that_does_not_fit_the_transformer(files, transformer_files, tiny_vae):
    from flux2kit.pipelines.generation.generate import generate
    from flux2kit.pipelines.models.transformer import load_transformer
    from flux2kit.pipelines.models.vae import load_vae

    transformer = load_transformer(transformer_files["comfy-fp8"], device="cpu")  # tiny [dev]: 384-wide text input
    vae = load_vae(tiny_vae[1], device="cpu")
    wide = load_text_encoder(files["llama-Q4_K"][0])  # a Mistral of width 256: 768-wide embeddings
    with pytest.raises(Flux2KitError, match="makes 768-wide embeddings but the transformer expects 384"):
        generate(transformer, wide, vae, prompt="a fox", width=64, height=64, num_inference_steps=1)
    qwen = load_text_encoder(files["qwen3-Q8_0"][0])
    with pytest.raises(Flux2KitError, match="the one FLUX.2 \\[klein\\] uses, but the transformer is FLUX.2 \\[dev\\]"):
        generate(transformer, qwen, vae, prompt="a fox", width=64, height=64, num_inference_steps=1)


def write(path, tensors, arch, kv=None):
    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in (kv or {}).items():
        w.add_uint32(key, value)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_other_models_in_the_text_encoder_slot(tmp_path):
    z = np.zeros((4, 8), np.float32)
    flux = write(tmp_path / "flux2-dev-Q8_0.gguf", {"double_blocks.0.img_attn.qkv.weight": z}, "flux")
    with pytest.raises(Flux2KitError, match="is a FLUX transformer, not a FLUX.2 text encoder. Load it with the transformer"):
        load_text_encoder(flux)
    gemma = write(tmp_path / "gemma.gguf", {"token_embd.weight": z}, "gemma3")
    with pytest.raises(Flux2KitError, match="is a GGUF of a 'gemma3' model, not a FLUX.2 text encoder.*Qwen3-4B/8B"):
        load_text_encoder(gemma)
    t5 = write(tmp_path / "t5.gguf", {"enc.blk.0.attn_q.weight": z}, "t5encoder")
    with pytest.raises(Flux2KitError, match="T5 text encoder \\(FLUX.1\\)"):
        load_text_encoder(t5)


def test_too_few_layers(qwen3, tmp_path):
    model, tok = qwen3
    path = str(tmp_path / "short.gguf")
    save_tiny_text_encoder_gguf(model, tok, path, arch="qwen3", num_layers=20)
    with pytest.raises(Flux2KitError, match="holds 20 layers of a Qwen3 text encoder; FLUX.2 \\[klein\\] reads .* 9, 18, 27"):
        load_text_encoder(path)


def test_unsupported_types_matter_only_where_flux2_reads(qwen3, tmp_path):
    model, tok = qwen3
    path = str(tmp_path / "late.gguf")
    save_tiny_text_encoder_gguf(model, tok, path, arch="qwen3")
    raw = bytearray(open(path, "rb").read())

    def retag(tensor: bytes, type_id: int) -> bytes:
        """The file with ``tensor`` given another type id (one of the same byte size, so the file stays whole)."""
        i = raw.index(tensor) + len(tensor)
        n_dims = int.from_bytes(raw[i:i + 4], "little")
        at = i + 4 + 8 * n_dims
        out = bytearray(raw)
        out[at:at + 4] = type_id.to_bytes(4, "little")
        return bytes(out)

    # an F32 norm (64 values = 256 bytes) read as I32 (the same size): a type flux2kit does not run
    late = retag(b"blk.27.attn_norm.weight", int(gguf.GGMLQuantizationType.I32))
    (tmp_path / "late.gguf").write_bytes(late)
    assert load_text_encoder(str(tmp_path / "late.gguf")).family == "qwen3"  # layer 27 is never read
    early = retag(b"blk.3.attn_norm.weight", int(gguf.GGMLQuantizationType.I32))
    (tmp_path / "early.gguf").write_bytes(early)
    with pytest.raises(UnsupportedFormatError, match="stores model.layers.3.input_layernorm.weight as I32"):
        load_text_encoder(str(tmp_path / "early.gguf"))


def test_quantize_on_load_from_gguf(files, tmp_path):
    """FP8 quantize-on-load reads the GGUF's dequantized weights: the same FP8 model as from an fp32 file of them."""
    from flux2kit.pipelines.files.quantize import write_comfy_text_encoder
    from flux2kit.pipelines.files.safetensors import StateDictFiles
    from flux2kit.pipelines.files.tokenizers import tekken_from_tokenizer

    path, _, reference, tok = files["mistral3-Q8_0"]
    te = load_text_encoder(path, weights="quantize")
    assert gguf_layers(te.model) == [] and len(fp8_linears(te.model)) == 7 * 30
    prefix = "model.language_model."
    state = {k: v.detach().clone() for k, v in reference.state_dict().items() if k.startswith(prefix)}
    fp32 = write_comfy_text_encoder(StateDictFiles(state), prefix, reference.config.text_config,
                                    str(tmp_path / "dequantized_fp32.safetensors"), quantize=False,
                                    tekken=tekken_from_tokenizer(tok))
    same = load_text_encoder(fp32, weights="quantize")
    assert rel(te.encode(PROMPTS).embeds, same.encode(PROMPTS).embeds) <= EXACT


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_compute(files, dtype):
    path, _, reference, tok = files["qwen3-Q8_0"]
    te = load_text_encoder(path, dtype=dtype)
    out = te.encode(PROMPTS).embeds
    assert out.dtype == dtype and rel(out.float(), qwen3_reference(reference, tok)) < 0.05
