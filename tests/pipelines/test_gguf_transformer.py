"""GGUF FLUX.2 transformers: tiny models written as ComfyUI-GGUF files, loaded by flux2kit, against two references:
the same model holding gguf's dequantized weights (converted by diffusers' own FLUX.2 converter), and diffusers'
``Flux2Transformer2DModel.from_single_file`` with ``GGUFQuantizationConfig`` on the same file."""

import gguf
import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel, GGUFQuantizationConfig

from flux2kit.pipelines.demo_models.gguf import RANDOM_ONLY, dequantized_transformer, save_tiny_transformer_gguf
from flux2kit.pipelines.demo_models.transformer import build_tiny_klein, build_tiny_transformer
from flux2kit.pipelines.errors import Flux2KitError, UnsupportedFormatError
from flux2kit.pipelines.files.gguf import GGUFFile
from flux2kit.pipelines.files.transformer_checkpoint import inspect_transformer
from flux2kit.pipelines.generation import sampling
from flux2kit.pipelines.models.fp8_linear import fp8_linears
from flux2kit.pipelines.models.gguf_linear import GGUFLinear, gguf_layers
from flux2kit.pipelines.models.transformer import load_transformer

# Ours vs the dequantized-weights model: the same fp32 weights, bit for bit; only summation order differs
# (our fused q|k|v matmul). Measured 0.
EXACT = 1e-5  # max abs difference / max abs output
# Ours vs diffusers' GGUF path: diffusers dequantizes through fp16 scales (about 5e-4 relative per weight);
# measured 2.0e-3 on IQ4_XS, 5.8e-4 on Q6_K, 6.4e-4 on the K-quant mix, 1e-5 on Q8_0, 0 on BF16/Q4_0/IQ4_NL.
DIFFUSERS = 5e-3
K_MIX = ["Q4_K", "Q6_K", "IQ4_XS", "Q5_K", "Q3_K", "Q2_K", "IQ4_NL"]
FILE_TYPES = ["BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", *RANDOM_ONLY]


def inputs(text_width, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(1, 16, 128, generator=g), latent_ids=sampling.latent_ids(1, 4, 4),
                text=torch.randn(1, 8, text_width, generator=g), text_ids=sampling.text_ids(1, 8),
                sigma=torch.full((1,), 0.7), guidance=torch.full((1,), 4.0))


def diffusers_forward(model, x):
    with torch.no_grad():
        return model(hidden_states=x["latents"], encoder_hidden_states=x["text"], timestep=x["sigma"],
                     img_ids=x["latent_ids"], txt_ids=x["text_ids"],
                     guidance=x["guidance"] if model.config.guidance_embeds else None, return_dict=False)[0]


def ours_forward(t, x):
    with torch.no_grad():
        return t(x["latents"], x["latent_ids"], x["text"], x["text_ids"], x["sigma"],
                 x["guidance"] if t.guidance_embeds else None)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def config_dir(tiny_transformer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_config")
    tiny_transformer.save_config(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def gguf_files(tiny_transformer, tmp_path_factory):
    """file type -> (path, reference model holding the file's dequantized weights)."""
    root = tmp_path_factory.mktemp("gguf_transformers")
    out = {}
    for name, types in [(t, t) for t in FILE_TYPES] + [("K-mix", K_MIX)]:
        path = str(root / f"tiny-{name}.gguf")
        reference = save_tiny_transformer_gguf(tiny_transformer, path, types, seed=3)
        out[name] = (path, dequantized_transformer(tiny_transformer, reference))
    return out


@pytest.mark.parametrize("name", FILE_TYPES + ["K-mix"])
def test_forward_equals_the_dequantized_model_and_diffusers(name, gguf_files, config_dir):
    path, reference = gguf_files[name]
    ours = load_transformer(path, device="cpu", dtype=torch.float32)
    x = inputs(384)
    out = ours_forward(ours, x)
    expected = diffusers_forward(reference, x)
    theirs = Flux2Transformer2DModel.from_single_file(
        path, config=config_dir, local_files_only=True, torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    vs_diffusers = rel(out, diffusers_forward(theirs, x))
    print(f"{name}: vs dequantized model {rel(out, expected):.1e}, vs diffusers' GGUF {vs_diffusers:.1e}")
    assert rel(out, expected) <= EXACT, rel(out, expected)
    assert vs_diffusers <= DIFFUSERS, vs_diffusers
    # not vacuous: another input changes the output by far more than the tolerances
    assert rel(ours_forward(ours, inputs(384, seed=2)), expected) > 100 * DIFFUSERS


def test_weights_stay_packed_and_the_mix_is_described(gguf_files):
    path, _ = gguf_files["K-mix"]
    t = load_transformer(path, device="cpu", dtype=torch.float32)
    layers = gguf_layers(t.model)
    f = GGUFFile(path)
    packed = {k: v for k, v in f.tensors.items() if len(v.shape) == 2 and v.type_name != "F32"}
    assert len(layers) == len(packed) == 31  # every 2-D weight: 23 block linears (K types) + 8 edge layers (BF16)
    assert {layer.ggml_type.name for layer in layers} == set(K_MIX) | {"BF16"}
    assert all(isinstance(m.weight, torch.Tensor) and m.weight.dtype == torch.uint8 for m in layers)
    held = sum(m.weight.numel() for m in layers)
    assert held == sum(v.nbytes for v in packed.values())  # memory = the file's packed bytes, nothing expanded
    assert "GGUF" in t.checkpoint and "Q4_K x" in t.checkpoint and "BF16 x8" in t.checkpoint
    assert t.quantization == "gguf"
    # diffusers' dtype property must not report uint8: packed weights are buffers, not parameters
    assert t.model.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_compute_dtypes(dtype, gguf_files):
    path, reference = gguf_files["Q8_0"]
    ours = load_transformer(path, device="cpu", dtype=dtype)
    layer = next(m for m in gguf_layers(ours.model) if m.ggml_type.name == "Q8_0")
    x = torch.randn(3, layer.in_features, dtype=dtype)
    w = layer.dequantized_weight(torch.float32)
    # one rounding: fp32 dequantization, then the compute dtype
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w.to(dtype)))
    out = ours_forward(ours, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs(384).items()})
    expected = diffusers_forward(reference, inputs(384))
    assert out.dtype == dtype and rel(out.float(), expected) < 0.05  # half-precision activations through 4 blocks


def test_block_offload_moves_packed_blocks(gguf_files):
    path, reference = gguf_files["Q4_K"]
    t = load_transformer(path, device="cpu", dtype=torch.float32, offload_blocks=True)
    x = inputs(384)
    out = ours_forward(t, x)
    assert t.offload.moves == 2 * 4  # in and out, for each of the 2 double + 2 single blocks
    assert rel(out, diffusers_forward(reference, x)) <= EXACT
    layer = next(m for m in gguf_layers(t.model.transformer_blocks[0]))
    layer.to("meta")  # buffers follow .to (a CUDA move works the same way)
    assert layer.weight.is_meta and layer.weight.dtype == torch.uint8


def test_gguf_linear_takes_a_lora_style_side_branch(gguf_files):
    """LoRA wraps or hooks a linear by in_features/out_features and adds x @ A @ B beside it."""
    path, _ = gguf_files["Q4_K"]
    t = load_transformer(path, device="cpu", dtype=torch.float32)
    layer = t.model.transformer_blocks[0].attn.to_qkv
    assert isinstance(layer, GGUFLinear) and (layer.in_features, layer.out_features) == (256, 768)
    a, b = torch.randn(layer.in_features, 4) * 0.1, torch.randn(4, layer.out_features) * 0.1
    x = torch.randn(2, 5, layer.in_features)
    base = layer(x)
    handle = layer.register_forward_hook(lambda m, args, out: out + args[0] @ a @ b)
    try:
        torch.testing.assert_close(layer(x), base + x @ a @ b)
    finally:
        handle.remove()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight()))


def test_weight_modes_dequantize_and_quantize(gguf_files):
    path, reference = gguf_files["Q8_0"]
    x = inputs(384)
    dense = load_transformer(path, device="cpu", dtype=torch.float32, weights="dequantize")
    assert gguf_layers(dense.model) == [] and rel(ours_forward(dense, x), diffusers_forward(reference, x)) <= EXACT
    fp8 = load_transformer(path, device="cpu", dtype=torch.float32, weights="quantize")
    assert gguf_layers(fp8.model) == [] and len(fp8_linears(fp8.model)) == 8 * 2 + 2 * 2  # block linears
    assert rel(ours_forward(fp8, x), diffusers_forward(reference, x)) < 0.1  # FP8 rounding on top of Q8_0


def test_klein_from_gguf(tmp_path):
    klein = build_tiny_klein(seed=4)
    path = str(tmp_path / "klein-Q5_0.gguf")
    reference = dequantized_transformer(klein, save_tiny_transformer_gguf(klein, path, "Q5_0", is_distilled=True))
    ckpt = inspect_transformer(path)
    assert ckpt.family == "klein" and ckpt.distilled is True and ckpt.quantization == "gguf"
    ckpt.files.close()
    t = load_transformer(path, device="cpu", dtype=torch.float32)
    assert t.name == "FLUX.2 [klein] distilled"
    x = inputs(klein.config.joint_attention_dim)
    assert rel(ours_forward(t, x), diffusers_forward(reference, x)) <= EXACT
    save_tiny_transformer_gguf(klein, str(tmp_path / "klein-unknown.gguf"), "Q8_0")
    with pytest.raises(Flux2KitError, match="does not say whether it is the distilled"):
        load_transformer(str(tmp_path / "klein-unknown.gguf"), device="cpu")


def test_prefixed_names_load_too(tiny_transformer, tmp_path):
    """ComfyUI-GGUF strips model.diffusion_model., but a file that kept it loads the same."""
    path = str(tmp_path / "prefixed.gguf")
    reference = dequantized_transformer(tiny_transformer, save_tiny_transformer_gguf(
        tiny_transformer, path, "Q8_0", prefix="model.diffusion_model."))
    t = load_transformer(path, device="cpu", dtype=torch.float32)
    assert rel(ours_forward(t, inputs(384)), diffusers_forward(reference, inputs(384))) <= EXACT


def test_bf16_vectors_load_as_floats(tiny_transformer, tmp_path):
    """Norm scales stored as BF16 (some converters) are read as floats: diffusers' GGUF path fails on them."""
    path = str(tmp_path / "bf16-vectors.gguf")
    reference = dequantized_transformer(tiny_transformer, save_tiny_transformer_gguf(
        tiny_transformer, path, "Q8_0", vectors="BF16"))
    assert GGUFFile(path).tensor("double_blocks.0.img_attn.norm.query_norm.scale").type_name == "BF16"
    t = load_transformer(path, device="cpu", dtype=torch.float32)
    assert rel(ours_forward(t, inputs(384)), diffusers_forward(reference, inputs(384))) <= EXACT


# -- bad input ----------------------------------------------------------------------------------


def write(path, tensors, arch):
    w = gguf.GGUFWriter(str(path), arch=arch)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_flux1_gguf_is_refused(tmp_path):
    """FLUX.1 GGUFs say "flux" too: the tensor names tell."""
    z = np.zeros((4, 8), np.float32)
    path = write(tmp_path / "flux2-dev-Q4_K_S.gguf", {  # named like a FLUX.2 file on purpose: names are never read
        "img_in.weight": z, "double_blocks.0.img_mod.lin.weight": z, "double_blocks.0.img_attn.qkv.weight": z,
        "vector_in.in_layer.weight": z}, "flux")
    with pytest.raises(Flux2KitError, match="is a FLUX.1 checkpoint, not a FLUX.2 transformer"):
        load_transformer(path, device="cpu")


def test_llm_gguf_in_the_transformer_slot_is_refused(tmp_path):
    z = np.zeros((4, 8), np.float32)
    path = write(tmp_path / "model.gguf", {"token_embd.weight": z, "blk.0.attn_q.weight": z,
                                           "blk.0.attn_norm.weight": np.zeros(8, np.float32)}, "llama")
    with pytest.raises(Flux2KitError, match="is a text encoder, not a FLUX.2 transformer. Load it with the text encoder"):
        load_transformer(path, device="cpu")


def test_sd3_gguf_is_refused(tmp_path):
    z = np.zeros((4, 8), np.float32)
    path = write(tmp_path / "sd3.gguf", {"joint_blocks.0.x_block.attn.qkv.weight": z, "x_embedder.proj.weight": z}, "sd3")
    with pytest.raises(Flux2KitError, match="is a Stable Diffusion 3 checkpoint, not a FLUX.2 transformer"):
        load_transformer(path, device="cpu")


def test_unsupported_quantization_is_named(tiny_transformer, tmp_path):
    path = str(tmp_path / "ternary.gguf")
    save_tiny_transformer_gguf(tiny_transformer, path, ["TQ2_0"] + ["Q8_0"] * 22)  # one ternary block linear
    bad = next(k for k, v in GGUFFile(path).tensors.items() if v.type_name == "TQ2_0")
    with pytest.raises(UnsupportedFormatError, match=f"stores {bad} as TQ2_0, a GGUF quantization flux2kit cannot run. "
                                                     "Supported: F32, BF16, F16, Q8_0"):
        load_transformer(path, device="cpu")


def test_truncated_gguf_transformer(gguf_files, tmp_path):
    path, _ = gguf_files["Q8_0"]
    data = open(path, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(Flux2KitError, match="cut.gguf is truncated.*download it again"):
        load_transformer(str(tmp_path / "cut.gguf"), device="cpu")
