"""`flux2kit quantize --format gguf-q8_0` (checked with gguf's own reader and quantizer, and diffusers' GGUF loader)
and `flux2kit generate` on GGUF files."""

import contextlib
import io
import os

import gguf
import numpy as np
import PIL.Image
import pytest
import torch
from gguf import GGMLQuantizationType as T

from flux2kit.cli import main
from flux2kit.pipelines.demo_models.gguf import dequantized_text_model, llama_cpp_name, llama_cpp_permute
from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3
from flux2kit.pipelines.demo_models.transformer import to_bfl
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.models.transformer import load_transformer

EDGE = ("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer.")


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dev_gguf(transformer_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "flux2-dev-tiny-Q8_0.gguf"
    code, stdout, stderr = run("quantize", transformer_files["bfl"], out, "--format", "gguf-q8_0")
    assert code == 0, stderr
    assert stdout.strip() == str(out) and "wrote transformer in GGUF Q8_0" in stderr
    return str(out)


def test_quantized_transformer_has_comfyui_ggufs_layout(dev_gguf, tiny_transformer):
    r = gguf.GGUFReader(dev_gguf)
    assert r.fields["general.architecture"].contents() == "flux"
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    source = {k: v.float().numpy() for k, v in to_bfl(tiny_transformer.state_dict()).items()}
    assert sorted(t.name for t in r.tensors) == sorted(source)  # BFL names, no prefix
    for t in r.tensors:
        values = source[t.name]
        if values.ndim == 1 or values.size <= 1024:
            assert t.tensor_type == T.F32 and np.array_equal(np.asarray(t.data), values), t.name
        elif t.name.startswith(EDGE):
            assert t.tensor_type == T.BF16, t.name
            assert np.array_equal(gguf.quants.dequantize(t.data, T.BF16), values)  # bf16 weights: exact
        else:
            assert t.tensor_type == T.Q8_0, t.name
            assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(values, T.Q8_0))  # gguf's own quantizer


def test_quantized_transformer_loads_here_and_in_diffusers(dev_gguf, tiny_transformer, tmp_path):
    from diffusers import Flux2Transformer2DModel, GGUFQuantizationConfig

    from flux2kit.pipelines.generation import sampling

    tiny_transformer.save_config(str(tmp_path))
    theirs = Flux2Transformer2DModel.from_single_file(
        dev_gguf, config=str(tmp_path), local_files_only=True, torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    ours = load_transformer(dev_gguf, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 128, generator=g)
    txt = torch.randn(1, 8, 384, generator=g)
    ids, tids = sampling.latent_ids(1, 4, 4), sampling.text_ids(1, 8)
    sigma, guidance = torch.full((1,), 0.5), torch.full((1,), 4.0)
    with torch.no_grad():
        a = ours(x, ids, txt, tids, sigma, guidance)
        b = theirs(hidden_states=x, encoder_hidden_states=txt, timestep=sigma, img_ids=ids, txt_ids=tids,
                   guidance=guidance, return_dict=False)[0]
        dense = tiny_transformer(hidden_states=x, encoder_hidden_states=txt, timestep=sigma, img_ids=ids, txt_ids=tids,
                                 guidance=guidance, return_dict=False)[0]
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-3  # diffusers' fp16 dequantization
    assert ((a - dense).norm() / dense.norm()).item() < 0.02  # Q8_0 rounding against the bf16 model


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_quantized_text_encoder_has_llama_cpps_layout(family, tmp_path):
    if family == "mistral":
        model, tok = build_tiny_mistral3(seed=0)
        src = save_tiny_mistral3(model, tok, str(tmp_path / "hf"), layout="pipeline")
        src = os.path.dirname(src)
        config, prefix = model.config.text_config, "model.language_model."
    else:
        model, tok = build_tiny_qwen3(seed=0)
        src = save_tiny_qwen3(model, tok, str(tmp_path / "hf"), layout="pipeline")
        src = os.path.dirname(src)
        config, prefix = model.config, "model."
    out = tmp_path / "te-Q8_0.gguf"
    code, _, stderr = run("quantize", src, out, "--format", "gguf-q8_0")
    assert code == 0 and "wrote text-encoder in GGUF Q8_0" in stderr
    r = gguf.GGUFReader(str(out))
    arch = r.fields["general.architecture"].contents()
    assert arch == ("llama" if family == "mistral" else "qwen3")
    assert r.fields["tokenizer.ggml.tokens"].contents() == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert r.fields[f"{arch}.attention.head_count_kv"].contents() == config.num_key_value_heads
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors and tensors["output_norm.weight"].tensor_type == T.F32
    state = {k[len(prefix):]: v.float().numpy() for k, v in model.state_dict().items() if k.startswith(prefix)}
    q = state["layers.0.self_attn.q_proj.weight"]
    expected_q = llama_cpp_permute(q, config.num_attention_heads, config.num_attention_heads) if family == "mistral" else q
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), gguf.quants.quantize(expected_q, T.Q8_0))
    k = state["layers.5.self_attn.k_proj.weight"]
    heads = (config.num_attention_heads, config.num_key_value_heads)
    expected_k = llama_cpp_permute(k, *heads) if family == "mistral" else k
    assert np.array_equal(np.asarray(tensors["blk.5.attn_k.weight"].data), gguf.quants.quantize(expected_k, T.Q8_0))
    # and it loads back as the model holding those Q8_0 weights
    reference = {}
    for name, values in state.items():
        g = llama_cpp_name(name)
        t = tensors[g]
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(values.shape)
        if family == "mistral" and (".attn_q." in g or ".attn_k." in g):
            kv = config.num_attention_heads if ".attn_q." in g else config.num_key_value_heads
            deq = deq[np.argsort(llama_cpp_permute(np.arange(values.shape[0]), config.num_attention_heads, kv))]
        reference[name] = torch.from_numpy(np.array(deq))
    ref_model = dequantized_text_model(model, reference)
    te = load_text_encoder(str(out))
    prompts = ["a fox", "Un chat noir 🦊"]
    if family == "mistral":
        from diffusers import Flux2Pipeline

        expected = Flux2Pipeline._get_mistral_3_small_prompt_embeds(ref_model, tok, prompts, dtype=torch.float32,
                                                                    device="cpu")
    else:
        from diffusers import Flux2KleinPipeline

        expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(ref_model, tok, prompts, dtype=torch.float32)
    ours = te.encode(prompts).embeds
    assert ((ours - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_fp8_from_a_gguf(dev_gguf, tmp_path):
    """The FP8 writer reads a GGUF like any other transformer: its dequantized weights, re-quantized to FP8."""
    from flux2kit.pipelines.models.fp8_linear import fp8_linears

    out = tmp_path / "from-gguf-fp8.safetensors"
    code, _, stderr = run("quantize", dev_gguf, out)
    assert code == 0, stderr
    fp8 = load_transformer(str(out), device="cpu")
    on_load = load_transformer(dev_gguf, device="cpu", weights="quantize")
    assert len(fp8_linears(fp8.model)) == 20 and fp8.quantization == "comfy-fp8"
    a, b = fp8.model.state_dict(), on_load.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_quantize_format_errors(transformer_files, tmp_path):
    code, _, stderr = run("quantize", transformer_files["bfl"], tmp_path / "x.safetensors", "--format", "gguf-q8_0")
    assert code != 0 and "OUT must end in .gguf" in stderr
    code, _, stderr = run("quantize", transformer_files["bfl"], tmp_path / "x.gguf")
    assert code != 0 and "OUT must end in .gguf with --format gguf-*, and not otherwise" in stderr
    assert not os.listdir(tmp_path)


def test_generate_runs_on_gguf_files(tmp_path):
    """The demo set's GGUF twins: the same command line as any other files; the PNG is what generate() makes."""
    from flux2kit.pipelines.demo_models import build_demo_models
    from flux2kit.pipelines.generation.generate import generate
    from flux2kit.pipelines.models.vae import load_vae

    paths = build_demo_models(str(tmp_path / "models"))
    code, stdout, stderr = run("generate", "--transformer", paths["transformer_gguf"], "--text-encoder",
                               paths["text_encoder_gguf"], "--vae", paths["vae"], "--prompt", "a lighthouse",
                               "--width", 80, "--height", 64, "--steps", 1, "--seed", 3, "--out", tmp_path / "out",
                               "--device", "cpu")
    assert code == 0, stderr
    assert "GGUF file, Q8_0 x" in stderr and "weights in memory" in stderr  # announced before loading
    assert "transformer, bfl layout, GGUF Q8_0 x" in stderr
    with PIL.Image.open(stdout.strip().splitlines()[-1]) as im:
        pixels = np.asarray(im.convert("RGB"))
    expected = generate(load_transformer(paths["transformer_gguf"], device="cpu"),
                        load_text_encoder(paths["text_encoder_gguf"]), load_vae(paths["vae"], device="cpu"),
                        prompt="a lighthouse", width=80, height=64, num_inference_steps=1, seed=3, guidance=4.0)
    assert np.array_equal(pixels, (expected[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def test_generate_names_a_missing_tokenizer(tmp_path):
    from flux2kit.pipelines.demo_models.gguf import save_tiny_text_encoder_gguf

    model, tok = build_tiny_qwen3(seed=0)
    te = str(tmp_path / "qwen3.gguf")
    save_tiny_text_encoder_gguf(model, tok, te, arch="qwen3", vocab=False)
    code, _, stderr = run("generate", "--transformer", te, "--text-encoder", te, "--vae", te, "--prompt", "x")
    assert code != 0  # the transformer slot refuses a text model first
    assert "is a text encoder, not a FLUX.2 transformer" in stderr
    with pytest.raises(Flux2KitError, match="without its tokenizer"):
        load_text_encoder(te)
