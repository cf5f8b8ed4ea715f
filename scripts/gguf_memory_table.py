"""The README's GGUF memory table: file sizes and memory of the real FLUX.2 models per format, computed.

Each format's bytes per weight (gguf's block sizes) times the real architectures' tensor shapes (models
built on the meta device from the published configs below), with the per-tensor type mix the public
conversions use:

- transformers: ComfyUI-GGUF's layout (tools/convert.py + tools/lcpp.patch, city96/ComfyUI-GGUF): 1-D
  and <= 1024-value tensors F32; img_in, txt_in, time_in, guidance_in, final_layer BF16; the fused
  ``attn.qkv`` one step up in the _M mixes (Q5_K in Q4_K_M, Q6_K in Q5_K_M, Q4_K in Q3_K_M); the rest
  in the file's type. (FLUX.2 has no other tensor the patch's rules name.)
- text encoders: llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) for a dense model without
  an imatrix: attn_v and ffn_down get more bits in some layers (``use_more_bits``), attn_output in
  Q2_K/Q3_K_M, the output layer Q6_K (and a tied embedding with it), norms F32.

Memory is what flux2kit holds (``pipelines/files/memory_estimate.py``): packed weights as stored, every
other tensor in the compute dtype (bf16 on a GPU, fp32 on a CPU), plus one layer dequantized while it
runs; with block offload only the non-block weights, one block and that layer are on the GPU. Text
encoders: only the embedding and the layers FLUX.2 reads (30 of Mistral's 40, 27 of Qwen3's 36).
Activations come on top (about 0.5-1 GB at 1 MP for [dev]).

    python scripts/gguf_memory_table.py     # prints the Markdown tables the README shows
"""

from __future__ import annotations

import sys

import torch

GB = 1e9
# Published configs (sources in the README's table notes).
TRANSFORMERS = {
    # black-forest-labs/FLUX.2-dev transformer/config.json (quoted in mflux-community/mflux#707)
    "FLUX.2 [dev]": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                         guidance_embeds=True),
    # black-forest-labs/FLUX.2-klein-4B transformer/config.json
    "FLUX.2 [klein] 4B": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                              guidance_embeds=False),
    # black-forest-labs/FLUX.2-klein-9B transformer/config.json
    "FLUX.2 [klein] 9B": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                              guidance_embeds=False),
}
TEXT_ENCODERS = {
    # mistralai/Mistral-Small-3.2-24B-Instruct-2506 text_config; FLUX.2 reads layers 10, 20, 30
    "Mistral-Small-3.x 24B ([dev])": dict(family="mistral", hidden_size=5120, intermediate_size=32768,
                                          num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                                          head_dim=128, vocab_size=131072, tie_word_embeddings=False),
    # Qwen/Qwen3-4B config.json; FLUX.2 [klein] 4B reads layers 9, 18, 27
    "Qwen3-4B ([klein] 4B)": dict(family="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                  tie_word_embeddings=True),
    # Qwen/Qwen3-8B config.json; FLUX.2 [klein] 9B
    "Qwen3-8B ([klein] 9B)": dict(family="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                  tie_word_embeddings=False),
}
# llama.cpp's file types, plus a BF16 GGUF and ComfyUI's FP8 safetensors (fp8mixed) for comparison
FORMATS = ["BF16", "FP8", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
LABELS = {"BF16": "BF16 (GGUF)", "FP8": "FP8 (ComfyUI .safetensors)"}
BASE = {"BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K",
        "Q2_K": "Q2_K"}
EDGE = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
QKV_STEP = {"Q5_K_M": "Q6_K", "Q4_K_M": "Q5_K", "Q3_K_M": "Q4_K"}


def type_bytes(type_name: str, numel: int) -> int:
    import gguf

    if type_name == "FP8":
        return numel
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return numel // block * size


# -- transformers ----------------------------------------------------------------------------------


def transformer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """BFL tensor name -> shape of the real transformer (built on meta; nothing allocated)."""
    from diffusers import Flux2Transformer2DModel

    from flux2kit.pipelines.demo_models.transformer import to_bfl

    full = dict(patch_size=1, in_channels=128, out_channels=None, attention_head_dim=128, mlp_ratio=3.0,
                timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, **config)
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**full)
    return {k: tuple(v.shape) for k, v in to_bfl(model.state_dict()).items()}


def transformer_type(name: str, shape, fmt: str) -> str:
    numel = int(torch.tensor(shape).prod())
    if len(shape) <= 1 or numel <= 1024:
        return "F32"
    if fmt == "FP8":  # ComfyUI's fp8mixed: block linears FP8, the rest bf16
        return "FP8" if name.startswith(("double_blocks.", "single_blocks.")) else "BF16"
    if name.startswith(EDGE):
        return "BF16"
    if name.endswith("attn.qkv.weight") and fmt in QKV_STEP:
        return QKV_STEP[fmt]
    return BASE[fmt]


# -- text encoders ---------------------------------------------------------------------------------


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def text_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """llama.cpp tensor name -> shape for a Mistral / Qwen3 language model."""
    h, inter, heads, kv, hd = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                               cfg["num_key_value_heads"], cfg["head_dim"])
    out = {"token_embd.weight": (cfg["vocab_size"], h), "output_norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        out["output.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        out.update({b + "attn_q.weight": (heads * hd, h), b + "attn_k.weight": (kv * hd, h),
                    b + "attn_v.weight": (kv * hd, h), b + "attn_output.weight": (h, heads * hd),
                    b + "ffn_gate.weight": (inter, h), b + "ffn_up.weight": (inter, h),
                    b + "ffn_down.weight": (h, inter), b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,)})
        if cfg["family"] == "qwen3":
            out.update({b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)})
    return out


def text_type(name: str, shape, fmt: str, cfg: dict) -> str:
    """llama.cpp's choice (llama_tensor_get_type_impl) for a dense llama/qwen3 model, no imatrix."""
    if len(shape) <= 1:
        return "F32"
    if fmt in ("BF16", "FP8"):
        return "FP8" if fmt == "FP8" and name.startswith("blk.") else "BF16"
    base = BASE[fmt]
    n = cfg["num_hidden_layers"]
    i = int(name.split(".")[1]) if name.startswith("blk.") else -1
    gqa = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    if name == "output.weight" or (cfg["tie_word_embeddings"] and name == "token_embd.weight"):
        return base if base == "Q8_0" else "Q6_K"
    if name.endswith("attn_v.weight"):
        if fmt == "Q2_K":
            return "Q4_K" if gqa >= 4 else "Q3_K"
        if fmt == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if fmt in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
    if name.endswith("ffn_down.weight"):
        if fmt == "Q2_K":
            return "Q3_K"
        if fmt == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if fmt in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
    if name.endswith("attn_output.weight"):
        if fmt == "Q2_K":
            return "Q3_K"
        if fmt == "Q3_K_M":
            return "Q4_K"
    return base


def kept_by_flux2(name: str, cfg: dict) -> bool:
    read = 30 if cfg["family"] == "mistral" else 27
    return name == "token_embd.weight" or (name.startswith("blk.") and int(name.split(".")[1]) < read)


# -- the tables ------------------------------------------------------------------------------------


def _costs(shapes: dict, type_of, keep=lambda name: True, fp8_file: bool = False):
    """TensorCosts as flux2kit's loaders hold them: GGUF keeps every 2-D non-F32 weight packed; an FP8
    safetensors file keeps its FP8 weights and casts the rest to the compute dtype."""
    from flux2kit.pipelines.files.memory_estimate import TensorCost

    costs, mix = [], {}
    for name, shape in shapes.items():
        if not keep(name):
            continue
        t = type_of(name, shape)
        numel = int(torch.tensor(shape).prod()) if shape else 1
        size = type_bytes(t, numel)
        mix[t] = mix.get(t, 0) + size
        kept = t == "FP8" if fp8_file else (len(shape) == 2 and t != "F32")
        costs.append(TensorCost(name, numel, size, kept))
    return costs, mix


def gb(n: float) -> str:
    return f"{n / GB:.1f}"


def mix_text(mix: dict[str, int]) -> str:
    total = sum(mix.values())
    parts = sorted(mix.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{t} {100 * size / total:.0f}%" for t, size in parts if size / total >= 0.005)


def transformer_table() -> str:
    from flux2kit.pipelines.files.memory_estimate import estimate

    rows = ["| transformer | format | file GB | type mix (share of bytes) | GPU GB, whole model | GPU GB, block offload "
            "| + system RAM GB (offload) | CPU-only RAM GB |", "|---|---|---|---|---|---|---|---|"]
    for model, config in TRANSFORMERS.items():
        shapes = transformer_shapes(config)
        params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
        for fmt in FORMATS:
            costs, mix = _costs(shapes, lambda n, s, f=fmt: transformer_type(n, s, f), fp8_file=fmt == "FP8")
            gpu = estimate(costs, torch.bfloat16)
            cpu = estimate(costs, torch.float32)
            label = f"{model} ({params / 1e9:.2f}B)" if fmt == FORMATS[0] else ""
            rows.append(f"| {label} | {LABELS.get(fmt, fmt)} | {gb(gpu.file_bytes)} | {mix_text(mix)} | "
                        f"{gb(gpu.resident + gpu.largest_layer)} | {gb(gpu.offload_gpu)} | {gb(gpu.blocks)} | "
                        f"{gb(cpu.resident + cpu.largest_layer)} |")
    return "\n".join(rows)


def text_encoder_table() -> str:
    from flux2kit.pipelines.files.memory_estimate import estimate

    rows = ["| text encoder | format | file GB | type mix of what FLUX.2 loads | loaded GB (GPU, bf16) "
            "| CPU-only RAM GB |", "|---|---|---|---|---|---|"]
    for model, cfg in TEXT_ENCODERS.items():
        shapes = text_tensors(cfg)
        params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
        for fmt in FORMATS:
            type_of = lambda n, s, f=fmt, c=cfg: text_type(n, s, f, c)  # noqa: E731
            file_costs, _ = _costs(shapes, type_of)
            costs, mix = _costs(shapes, type_of, lambda n, c=cfg: kept_by_flux2(n, c), fp8_file=fmt == "FP8")
            gpu, cpu = estimate(costs, torch.bfloat16), estimate(costs, torch.float32)
            label = f"{model} ({params / 1e9:.1f}B)" if fmt == FORMATS[0] else ""
            rows.append(f"| {label} | {LABELS.get(fmt, fmt)} | {gb(sum(c.stored_bytes for c in file_costs))} | {mix_text(mix)} | "
                        f"{gb(gpu.resident + gpu.largest_layer)} | {gb(cpu.resident + cpu.largest_layer)} |")
    return "\n".join(rows)


def main() -> int:
    print(transformer_table())
    print()
    print(text_encoder_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
