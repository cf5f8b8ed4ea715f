"""LoRAs on GGUF transformers: a side branch beside the packed GGUFLinear layers, equal to diffusers'
``load_lora_weights`` on the model holding the file's dequantized weights (fp32); the packed bytes never change;
merge mode refused with a clear message (GGUF weights are never re-quantized)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from flux2kit.pipelines.demo_models import lora as demo
from flux2kit.pipelines.demo_models.gguf import dequantized_transformer, save_tiny_transformer_gguf
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.files.lora_formats import read_lora
from flux2kit.pipelines.models.gguf_linear import GGUFLinear, gguf_layers
from flux2kit.pipelines.models.lora import LoraEntry, apply_loras
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.testing.lora_reference import diffusers_with_lora, inputs, rel, run, run_diffusers

peft = pytest.importorskip("peft")

# Ours vs diffusers + peft on the same fp32 weights (the file's, dequantized by gguf): summation order only
# (our fused q|k|v, the LoRA added to the output in place). Measured 1.1e-7 - 1.6e-7.
FP32 = 5e-6
TYPES = {"Q8_0": "Q8_0", "Q4_K": "Q4_K", "K-mix": ["Q4_K", "Q6_K", "Q2_K"]}
STACK = [("a", 0.7), ("b", -1.3)]


@pytest.fixture(scope="module")
def gguf_files(tiny_transformer, tmp_path_factory):
    """name -> (path, fp32 diffusers model holding the file's dequantized weights)."""
    root = tmp_path_factory.mktemp("gguf_lora")
    out = {}
    for name, types in TYPES.items():
        path = str(root / f"tiny-{name}.gguf")
        out[name] = (path, dequantized_transformer(tiny_transformer, save_tiny_transformer_gguf(
            tiny_transformer, path, types, seed=3)))
    return out


@pytest.fixture(scope="module")
def peft_files(tiny_transformer, tmp_path_factory):
    """Two diffusers-format LoRAs on every layer (alpha 8 / rank 4 in peft's adapter metadata: scale 2)."""
    root = tmp_path_factory.mktemp("gguf_lora_files")
    config = dict(tiny_transformer.config)
    return {name: demo.save_lora(demo.random_lora(config, rank=4, seed=seed, std=0.03), str(root / f"{name}.safetensors"),
                                 "diffusers", alpha=8.0, dtype=torch.float32)
            for name, seed in (("a", 11), ("b", 12))}


def _tensors(model):
    return dict(model.model.state_dict(keep_vars=True))


def _unchanged(model, before, copies):
    after = _tensors(model)
    return (after.keys() == before.keys() and all(after[k] is before[k] for k in before)
            and all(torch.equal(after[k], copies[k]) for k in before)
            and not any(m._forward_hooks for m in model.model.modules()))


@pytest.mark.parametrize("name", list(TYPES))
def test_side_branch_on_gguf_equals_diffusers_load_lora_weights(name, gguf_files, peft_files):
    path, dequantized = gguf_files[name]
    ours = load_transformer(path, device="cpu", dtype=torch.float32)
    before = _tensors(ours)
    copies = {k: v.detach().clone() for k, v in before.items()}
    x = inputs()
    base_out = run(ours, x)
    expected = run_diffusers(diffusers_with_lora(dequantized, [peft_files[n] for n, _ in STACK],
                                                 weights=[s for _, s in STACK]), x)
    variant = apply_loras(ours, [LoraEntry(read_lora(peft_files[n]), s) for n, s in STACK])
    # every adapted layer is a packed GGUF layer (the q/k/v LoRAs on the file's fused qkv rows)
    assert variant.bindings and all(isinstance(b.module, GGUFLinear) for b in variant.bindings)
    assert {b.module.ggml_type.name for b in variant.bindings} == {t.ggml_type.name for t in gguf_layers(ours.model)}
    assert any(b.dst is not None for b in variant.bindings)
    out = run(variant, x)
    print(f"LoRA stack on GGUF {name}: {rel(out, expected):.1e} relative to diffusers + peft on the dequantized model")
    assert rel(out, expected) < FP32, rel(out, expected)
    assert rel(base_out, expected) > 1e-2  # not vacuous: the LoRAs change the output
    # the packed weights stayed packed and untouched: same tensors, same bytes; without the LoRA, the same output
    assert all(m.weight.dtype == torch.uint8 for m in gguf_layers(ours.model))
    assert _unchanged(ours, before, copies)
    assert torch.equal(run(ours, x), base_out)
    assert torch.equal(run(variant, x), out)  # and the variant again gives what it gave


def test_peft_dora_on_gguf_reads_the_dequantized_weights(gguf_files, tiny_transformer, tmp_path):
    """DoRA's norms come from the base weight: here the packed K-quant blocks, dequantized; peft on the dequantized
    model is the reference."""
    path, dequantized = gguf_files["K-mix"]
    layers = ["double_blocks.0.img_mlp.0", "double_blocks.1.img_attn.qkv", "single_blocks.1.linear1", "img_in"]
    lora = demo.random_lora(dict(tiny_transformer.config), rank=4, seed=5, layers=layers)
    sd, meta = demo.lora_state_dict(lora, "diffusers", alpha=8.0)
    g = torch.Generator().manual_seed(9)
    weights = dequantized.state_dict()
    for key in [k for k in sd if k.endswith("lora_B.weight")]:
        module = key[len("transformer."):-len(".lora_B.weight")]
        w = weights[module + ".weight"] + 2.0 * sd[key] @ sd[key.replace("lora_B", "lora_A")]
        sd[f"transformer.{module}.lora_magnitude_vector"] = w.norm(dim=1) * (1 + 0.2 * torch.rand(w.shape[0], generator=g))
    header = json.loads(meta["lora_adapter_metadata"]) | {"transformer.use_dora": True}
    dora_path = str(tmp_path / "dora.safetensors")
    save_file(sd, dora_path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header)})
    ours = load_transformer(path, device="cpu", dtype=torch.float32)
    variant = apply_loras(ours, [LoraEntry(read_lora(dora_path), 0.6)])
    types = {b.module.ggml_type.name for b in variant.bindings}
    assert "BF16" in types and len(types & {"Q4_K", "Q6_K", "Q2_K"}) >= 2  # K-quants and the BF16 img_in
    expected = run_diffusers(diffusers_with_lora(dequantized, dora_path, weights=[0.6]), inputs())
    assert rel(run(variant, inputs()), expected) < FP32
    plain = demo.save_lora(lora, str(tmp_path / "plain.safetensors"), "diffusers", alpha=8.0, dtype=torch.float32)
    assert rel(run(apply_loras(ours, [LoraEntry(read_lora(plain), 0.6)]), inputs()), expected) > 100 * FP32  # norms matter


def test_block_offload(gguf_files, peft_files):
    """Blocks kept in RAM and moved in for their turn carry the LoRA's hooks with them: the same output."""
    path, _ = gguf_files["Q4_K"]
    entries = [LoraEntry(read_lora(peft_files["a"]), 0.8)]
    expected = run(apply_loras(load_transformer(path, device="cpu", dtype=torch.float32), entries), inputs())
    model = load_transformer(path, device="cpu", dtype=torch.float32, offload_blocks=True)
    moves = model.offload.moves
    out = run(apply_loras(model, entries), inputs())
    assert model.offload.moves > moves
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K"])
def test_merge_is_refused_on_gguf_layers(name, gguf_files, peft_files, tiny_transformer, tmp_path):
    path, _ = gguf_files[name]
    ours = load_transformer(path, device="cpu", dtype=torch.float32)
    before = _tensors(ours)
    copies = {k: v.detach().clone() for k, v in before.items()}
    base_out = run(ours, inputs())
    lora = read_lora(peft_files["a"])
    message = (rf"Merge mode cannot add a LoRA into GGUF layers: \S+ is a GGUFLinear holding packed GGUF {name} "
               rf"blocks \(the merged LoRAs change 31 GGUF layers: {name} x23, BF16 x8\)\. GGUF weights stay packed "
               r"and are never re-quantized .*side branch only.*choose mode 'side branch' on FLUX\.2 Load LoRA, or "
               r"leave out --lora-merge")
    for entries in ([LoraEntry(lora, merge=True)], [LoraEntry(lora, 0.5, merge=True, rounding="stochastic")],
                    [LoraEntry(lora, 0.5), LoraEntry(read_lora(peft_files["b"]), merge=True)]):  # one of a stack
        with pytest.raises(Flux2KitError, match=message):
            apply_loras(ours, entries)
    # a LoRA on the BF16 edge layers only: named by their own type
    edge = demo.save_lora(demo.random_lora(dict(tiny_transformer.config), rank=2, seed=1, layers=["img_in", "txt_in"]),
                          str(tmp_path / "edge.safetensors"), "bfl")
    with pytest.raises(Flux2KitError, match=r"(x_embedder|context_embedder) is a GGUFLinear holding packed GGUF BF16 "
                                            r"blocks \(the merged LoRAs change 2 GGUF layers: BF16 x2\)"):
        apply_loras(ours, [LoraEntry(read_lora(edge), merge=True)])
    assert _unchanged(ours, before, copies)
    assert torch.equal(run(ours, inputs()), base_out)


def test_merge_into_a_gguf_loaded_with_its_weights_expanded(gguf_files, peft_files):
    """weights="dequantize" makes ordinary fp32 layers of the file's values: merge works there, as on any fp32 model."""
    path, _ = gguf_files["Q4_K"]
    packed = load_transformer(path, device="cpu", dtype=torch.float32)
    dense = load_transformer(path, device="cpu", dtype=torch.float32, weights="dequantize")
    assert gguf_layers(dense.model) == []
    lora = read_lora(peft_files["a"])
    side = run(apply_loras(packed, [LoraEntry(lora, 0.8)]), inputs())
    merged = run(apply_loras(dense, [LoraEntry(lora, 0.8, merge=True)]), inputs())
    assert rel(merged, side) < FP32
