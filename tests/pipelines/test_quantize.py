"""Quantize-on-load and saving FP8 in ComfyUI's current format (pipelines/files/quantize.py).

The claims: a model quantized while loading holds exactly the tensors of a file quantized offline;
the file is in ComfyUI's current FP8 layout; our engine loads it with identical outputs; and the
per-tensor scale choice costs (almost) nothing against per-row scales on these weights.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.models.fp8_linear import FP8Linear, fp8_linears
from flux2kit.pipelines.files.fp8 import dequantize_weight, quantize_weight
from flux2kit.pipelines.files.quantize import (
    COMFY_TRANSFORMER_PREFIX,
    is_quantizable_text_encoder_layer,
    quantize_tensor,
    save_fp8_transformer,
    write_safetensors,
)
from flux2kit.pipelines.files.safetensors import read_header
from flux2kit.pipelines.generation.sampling import latent_ids, text_ids
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.files.safetensors import StateDictFiles
from flux2kit.pipelines.files.quantize import save_text_encoder_file
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.testing.tensors import same_tensors

FP8 = torch.float8_e4m3fn


def forward(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 24, 128, generator=g)
    ctx = torch.randn(1, 16, t.text_width, generator=g)
    with torch.no_grad():
        return t(x, latent_ids(1, 4, 6), ctx, text_ids(1, 16), torch.tensor([0.7]), torch.tensor([4.0]))


@pytest.fixture(scope="module")
def saved(transformer_files, tmp_path_factory):
    """source layout -> FP8 file written by save_fp8_transformer from that layout."""
    root = tmp_path_factory.mktemp("fp8")
    return {layout: save_fp8_transformer(transformer_files[layout], str(root / f"{layout}.safetensors"))
            for layout in ("bfl", "diffusers", "comfy-fp8")}


# --- identity: quantize on load == file quantized offline ------------------------------------------

@pytest.mark.parametrize("layout", ["bfl", "diffusers", "comfy-fp8"])
def test_quantize_on_load_equals_the_saved_file(layout, transformer_files, saved):
    on_load = load_transformer(transformer_files[layout], device="cpu", weights="quantize")
    from_file = load_transformer(saved[layout], device="cpu")
    assert on_load.quantization == from_file.quantization == "comfy-fp8"
    assert same_tensors(on_load.model.state_dict(), from_file.model.state_dict()) == []
    assert torch.equal(forward(on_load), forward(from_file))


def test_bf16_and_diffusers_sources_give_the_same_file(saved):
    assert same_tensors(load_file(saved["bfl"]), load_file(saved["diffusers"])) == []


def test_quantized_layers_stay_fp8_in_memory(transformer_files):
    t = load_transformer(transformer_files["bfl"], device="cpu", weights="quantize")
    layers = fp8_linears(t.model)
    # 2 double blocks x (2 fused qkv + 2 out + 4 mlp) + 2 single blocks x 2
    assert len(layers) == 20
    assert all(layer.weight.dtype == FP8 and layer.weight_scale.ndim == 0 for layer in layers)
    assert not isinstance(t.model.x_embedder, FP8Linear) and t.model.x_embedder.weight.dtype == torch.float32


def test_quantized_weights_are_the_per_tensor_quantization_of_the_bf16_ones(tiny_transformer, transformer_files):
    t = load_transformer(transformer_files["bfl"], device="cpu", weights="quantize")
    layer = t.model.single_transformer_blocks[0].attn.to_out
    w = tiny_transformer.single_transformer_blocks[0].attn.to_out.weight.detach()
    expected_w, expected_scale = quantize_weight(w, per_row=False)
    assert torch.equal(layer.weight.view(torch.uint8), expected_w.view(torch.uint8))
    assert torch.equal(layer.weight_scale, expected_scale)


def test_quantized_model_is_close_to_bf16_on_a_shallow_model(transformer_files):
    # FP8 vs bf16 only on a shallow model: random deep models amplify the rounding (DEVELOPERS.md, "Tiny models").
    bf16 = forward(load_transformer(transformer_files["bfl"], device="cpu"))
    fp8 = forward(load_transformer(transformer_files["bfl"], device="cpu", weights="quantize"))
    assert ((fp8 - bf16).norm() / bf16.norm()).item() < 0.01  # measured 0.096%


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_klein_distilled_flag_goes_into_the_fp8_file(layout, tmp_path):
    from flux2kit.pipelines.demo_models.transformer import build_tiny_klein, save_transformer

    src = save_transformer(build_tiny_klein(seed=4), str(tmp_path / ("src" if layout == "diffusers" else "src.safetensors")),
                           layout, is_distilled=False)
    out = save_fp8_transformer(src, tmp_path / "klein_fp8.safetensors")
    assert read_header(out).metadata["is_distilled"] == "false"
    from_file = load_transformer(out, device="cpu")
    on_load = load_transformer(src, device="cpu", weights="quantize")
    assert from_file.quantization == on_load.quantization == "comfy-fp8"
    assert same_tensors(on_load.model.state_dict(), from_file.model.state_dict()) == []
    assert not from_file.model.config.guidance_embeds


# --- the file is ComfyUI's current FP8 format -------------------------------------------------------

def test_saved_file_is_comfyui_current_fp8_format(saved):
    header = read_header(saved["bfl"])
    tensors = header.tensors
    quant_layers = sorted(k[: -len(".comfy_quant")] for k in tensors if k.endswith(".comfy_quant"))
    assert len(quant_layers) == 20
    assert all(k.startswith(COMFY_TRANSFORMER_PREFIX) for k in tensors)
    with safe_open(saved["bfl"], "pt") as f:
        for layer in quant_layers:
            assert layer.split(".")[2] in ("double_blocks", "single_blocks")
            assert tensors[f"{layer}.weight"].dtype == "F8_E4M3"
            assert tensors[f"{layer}.weight_scale"] == type(tensors[f"{layer}.weight_scale"])("F32", ())
            assert json.loads(f.get_tensor(f"{layer}.comfy_quant").numpy().tobytes()) == {"format": "float8_e4m3fn"}
            assert f"{layer}.input_scale" not in tensors
    # the header entry lists the same layers, named within the model (ComfyUI's UNETLoader applies it
    # after stripping model.diffusion_model.; see the next test)
    meta = json.loads(header.metadata["_quantization_metadata"])
    assert meta["format_version"] == "1.0"
    assert sorted(COMFY_TRANSFORMER_PREFIX + k for k in meta["layers"]) == quant_layers
    assert all(v == {"format": "float8_e4m3fn"} for v in meta["layers"].values())
    # embedders, modulation and the final layer stay bf16, as in ComfyUI's fp8mixed files
    for name in ("img_in.weight", "txt_in.weight", "double_stream_modulation_img.lin.weight",
                 "final_layer.linear.weight", "double_blocks.0.img_attn.norm.query_norm.scale"):
        assert tensors[COMFY_TRANSFORMER_PREFIX + name].dtype == "BF16"


def _comfyui_unet_state_dict(path, *, drop_comfy_quant_tensors=False):
    """The state dict ComfyUI 0.29's load_diffusion_model_state_dict hands the model (comfy/sd.py):
    convert_old_quants (its metadata branch) on the full keys, strip model.diffusion_model. keeping only
    those keys, convert_old_quants again with the same metadata. A simulation: the real ComfyUI check (its log
    has no "unexpected" line for our file) is in tests/nodes/test_real_comfyui_fp8.py."""
    sd = {k: None for k in read_header(path).tensors}
    if drop_comfy_quant_tensors:
        sd = {k: v for k, v in sd.items() if not k.endswith(".comfy_quant")}
    metadata = read_header(path).metadata

    def convert_old_quants(state):
        if "_quantization_metadata" in metadata:
            for k in json.loads(metadata["_quantization_metadata"])["layers"]:
                state[f"{k}.comfy_quant"] = None
        return state

    sd = convert_old_quants(sd)
    stripped = {k[len(COMFY_TRANSFORMER_PREFIX):]: v for k, v in sd.items() if k.startswith(COMFY_TRANSFORMER_PREFIX)}
    return set(convert_old_quants(stripped))


def test_comfyui_unet_loader_reads_the_header_entry_without_stray_keys(saved):
    """Full names in _quantization_metadata came back from ComfyUI's second pass as keys no layer has
    (logged as "unet unexpected: [...]" for every FP8 layer)."""
    keys = _comfyui_unet_state_dict(saved["bfl"])
    assert keys == {k[len(COMFY_TRANSFORMER_PREFIX):] for k in read_header(saved["bfl"]).tensors}
    # the header entry alone (no comfy_quant tensors) still marks every FP8 layer
    assert _comfyui_unet_state_dict(saved["bfl"], drop_comfy_quant_tensors=True) == keys


def test_header_entry_alone_marks_the_fp8_layers_for_our_loader(saved, tmp_path):
    from flux2kit.pipelines.files.transformer_checkpoint import inspect_transformer

    state = {k: v for k, v in load_file(saved["bfl"]).items() if not k.endswith(".comfy_quant")}
    bare = tmp_path / "header_only.safetensors"
    write_safetensors(bare, StateDictFiles(state), metadata=read_header(saved["bfl"]).metadata)
    a, b = inspect_transformer(saved["bfl"]), inspect_transformer(bare)
    try:
        assert b.quantization == "comfy-fp8" and b.layers == a.layers and len(a.layers) == 20
    finally:
        a.files.close()
        b.files.close()


def test_saved_file_without_header_entry_loads_the_same(transformer_files, saved, tmp_path):
    plain = save_fp8_transformer(transformer_files["bfl"], tmp_path / "plain.safetensors", header_metadata=False)
    assert "_quantization_metadata" not in read_header(plain).metadata
    assert same_tensors(load_file(plain), load_file(saved["bfl"])) == []


def test_saved_file_loads_with_identical_outputs(saved, transformer_files):
    ours = load_transformer(saved["bfl"], device="cpu")
    assert ours.quantization == "comfy-fp8"
    again = load_transformer(saved["bfl"], device="cpu", weights="dequantize")
    # the dequantized path computes the same products from the same numbers
    torch.testing.assert_close(forward(again), forward(ours), rtol=1e-5, atol=1e-6)


def test_requantizing_an_fp8_file_is_stable(saved, tmp_path):
    again = save_fp8_transformer(saved["bfl"], tmp_path / "again.safetensors")
    a, b = load_file(saved["bfl"]), load_file(again)
    # dequantize -> quantize of an e4m3 tensor gives the same codes (amax/448 is the old scale)
    assert same_tensors(a, b) == []


# --- per-tensor vs per-row: the measurement behind the choice --------------------------------------

def rel_err(w, per_row):
    q, s = quantize_weight(w, per_row=per_row)
    return ((dequantize_weight(q, s, torch.float32) - w).norm() / w.norm()).item()


def test_per_row_scales_gain_little_on_the_tiny_weights(tiny_transformer):
    ws = [p.detach().float() for n, p in tiny_transformer.named_parameters()
          if p.ndim == 2 and "transformer_blocks" in n]
    tensor = sum(rel_err(w, False) for w in ws) / len(ws)
    row = sum(rel_err(w, True) for w in ws) / len(ws)
    assert row <= tensor < 0.03  # e4m3: 3 mantissa bits, ~2.6% relative RMS error
    assert tensor / row < 1.02  # measured 2.553% vs 2.541%


def test_per_row_scales_only_pay_off_for_extreme_outlier_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 512, generator=g) * 0.02

    def others(w, per_row):  # error of the ordinary rows when 4 rows are scaled up
        q, s = quantize_weight(w, per_row=per_row)
        d = dequantize_weight(q, s, torch.float32)
        return ((d - w).norm(dim=1) / w.norm(dim=1))[4:].mean().item()

    for factor, max_ratio in ((100, 1.02), (1000, 1.02)):
        w2 = w.clone()
        w2[:4] *= factor
        assert others(w2, False) / others(w2, True) < max_ratio
    w2 = w.clone()
    w2[:4] *= 10000  # the ordinary rows fall into e4m3's subnormals
    assert others(w2, False) / others(w2, True) > 1.5


# --- text encoders ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral_hf(tmp_path_factory):
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3

    model, tok = build_tiny_mistral3(seed=3)
    folder = str(tmp_path_factory.mktemp("mistral_hf"))
    save_tiny_mistral3(model, tok, folder, layout="pipeline")
    return folder


def test_text_encoder_quantize_on_load_equals_the_saved_file(mistral_hf, tmp_path):
    out = save_text_encoder_file(mistral_hf, tmp_path / "te_fp8.safetensors", quantize=True)
    on_load = load_text_encoder(mistral_hf, weights="quantize")
    from_file = load_text_encoder(str(out))
    assert same_tensors(on_load.model.state_dict(), from_file.model.state_dict()) == []
    assert len(fp8_linears(on_load.model)) == 7 * 30  # q,k,v,o,gate,up,down of the 30 layers FLUX.2 reads
    prompts = ["a red fox", "café 123"]
    assert torch.equal(on_load.encode(prompts).embeds, from_file.encode(prompts).embeds)


def test_text_encoder_layers_chosen_for_quantization():
    assert is_quantizable_text_encoder_layer("model.layers.3.self_attn.q_proj")
    assert is_quantizable_text_encoder_layer("layers.29.mlp.down_proj")
    assert not is_quantizable_text_encoder_layer("model.embed_tokens")
    assert not is_quantizable_text_encoder_layer("model.layers.0.input_layernorm")
    assert not is_quantizable_text_encoder_layer("lm_head")


def test_unknown_weight_mode(transformer_files, mistral_hf):
    with pytest.raises(Flux2KitError, match="Unknown weight mode"):
        load_transformer(transformer_files["bfl"], device="cpu", weights="fp4")
    with pytest.raises(Flux2KitError, match="Unknown weight mode"):
        load_text_encoder(mistral_hf, weights="fp4")


# --- the streaming writer ---------------------------------------------------------------------------

def test_streaming_writer_matches_safetensors(tmp_path):
    state = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": quantize_tensor(torch.randn(4, 4))[0],
             "s": torch.tensor(0.5), "u": torch.arange(5, dtype=torch.uint8)}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, StateDictFiles(state), metadata={"k": "v"})
    back = load_file(path)
    assert same_tensors(back, state) == []
    assert read_header(path).metadata == {"k": "v"}


def test_streaming_writer_leaves_nothing_on_failure(tmp_path):
    class Broken(StateDictFiles):
        def get(self, key):
            raise RuntimeError("disk on fire")

    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        write_safetensors(path, Broken({"a": torch.zeros(2)}))
    assert os.listdir(tmp_path) == []


def test_streaming_writer_reports_an_unwritable_place_as_a_user_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(Flux2KitError, match="Could not write"):
        write_safetensors(blocker / "x.safetensors", StateDictFiles({"a": torch.zeros(2)}))
    assert sorted(os.listdir(tmp_path)) == ["not_a_folder"]
