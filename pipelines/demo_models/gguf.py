"""Tiny FLUX.2 transformers and text encoders written as GGUF, the way the public conversions are, for tests.

Written with ``gguf.GGUFWriter`` directly (not flux2kit's own writer, so the loaders are checked
against independently written files):

- transformers in ComfyUI-GGUF's layout (architecture ``flux``, BFL names, 1-D and tiny tensors F32,
  embedders and final layer BF16, the rest in the requested types);
- text encoders in llama.cpp's layout (``blk.N.attn_q.weight`` ...; Mistral with llama.cpp's Q/K row
  permutation, copied here from its ``LlamaModel.permute``; Qwen3 without), with the vocabulary.

Types gguf can quantize (BF16, Q8_0, Q5_0/1, Q4_0/1) quantize the model's weights. K-quants and
IQ4 it can only dequantize, so their blocks are random bytes with small valid fp16 scales (random
bits there could be Inf/NaN); those need rows that are multiples of 256. Every writer returns the
values the file holds, dequantized by ``gguf.quants.dequantize`` (the reference implementation),
for building reference models.
"""

from __future__ import annotations

import numpy as np
import torch

# The fp16 fields (d, dmin / m) inside one block, per type (llama.cpp's block structs): (byte offset, factor).
# The factor of the min field (the mean quant times d, negative where it is added) centres weights on 0.
_FP16_FIELDS = {"Q4_0": [(0, 1)], "Q4_1": [(0, 1), (2, -7.5)], "Q5_0": [(0, 1)], "Q5_1": [(0, 1), (2, -15.5)],
                "Q8_0": [(0, 1)], "Q2_K": [(80, 1), (82, 1.5)], "Q3_K": [(108, 1)], "Q4_K": [(0, 1), (2, 7.5)],
                "Q5_K": [(0, 1), (2, 15.5)], "Q6_K": [(208, 1)], "IQ4_NL": [(0, 1)], "IQ4_XS": [(0, 1)]}
# fp16 scales drawn uniformly in [0, s): weights come out around 0.01-0.1, like trained ones.
_RANDOM_SCALE = {"Q2_K": 2e-3, "Q3_K": 2e-3, "Q4_K": 1e-4, "Q5_K": 5e-5, "Q6_K": 1e-4, "IQ4_NL": 3e-4,
                 "IQ4_XS": 3e-4, "Q4_0": 5e-3, "Q4_1": 5e-3, "Q5_0": 3e-3, "Q5_1": 3e-3, "Q8_0": 5e-4}
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")  # gguf.quants.quantize implements these
RANDOM_ONLY = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")
EDGE_LAYERS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def _T(name):
    import gguf

    return gguf.GGMLQuantizationType[name] if isinstance(name, str) else name


def random_blocks(ggml_type, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of ``ggml_type``: ``(rows, bytes_per_row)`` uint8 with finite small fp16 scales."""
    import gguf

    t = _T(ggml_type)
    block, size = gguf.GGML_QUANT_SIZES[t]
    if cols % block:
        raise ValueError(f"{t.name} needs rows that are multiples of {block}, not {cols}")
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset, factor in _FP16_FIELDS[t.name]:
        scale = (rng.random((rows, cols // block)) * _RANDOM_SCALE[t.name] * factor).astype(np.float16)
        raw[..., offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, cols // block * size)


def encode(values: np.ndarray, ggml_type, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(what the file stores, what it dequantizes to)`` for float ``values`` stored as ``ggml_type``."""
    import gguf

    t = _T(ggml_type)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if t.name == "F32":
        return values, values
    if t.name == "F16":
        half = values.astype(np.float16)
        return half, half.astype(np.float32)
    if t.name in QUANTIZABLE or t.name not in _FP16_FIELDS:  # e.g. TQ2_0, which flux2kit does not run
        packed = gguf.quants.quantize(values, t)
    else:
        packed = random_blocks(t, int(np.prod(values.shape[:-1])), values.shape[-1], rng).reshape(
            *values.shape[:-1], -1)
    return packed, gguf.quants.dequantize(packed, t).reshape(values.shape).astype(np.float32)


def _write(path: str, arch: str, entries: list[tuple[str, object, np.ndarray]], configure=None) -> None:
    import gguf

    w = gguf.GGUFWriter(path, arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if configure is not None:
        configure(w)
    for name, t, stored in entries:
        if _T(t).name in ("F32", "F16"):
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, stored, raw_dtype=_T(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------------------------
# Transformers


def transformer_type(name: str, shape, choice) -> str:
    """The type a tensor gets in ComfyUI-GGUF's layout when the file's main type is ``choice``."""
    import gguf

    n = int(np.prod(shape))
    if len(shape) <= 1 or n <= 1024:
        return "F32"
    if name.startswith(EDGE_LAYERS):
        return "BF16"
    block = gguf.GGML_QUANT_SIZES[_T(choice)][0]
    return _T(choice).name if shape[-1] % block == 0 else "F16"


def save_tiny_transformer_gguf(model, path: str, types="Q8_0", *, seed: int = 0, prefix: str = "",
                               is_distilled: bool | None = None, vectors: str = "F32") -> dict[str, torch.Tensor]:
    """Write a diffusers ``Flux2Transformer2DModel`` as a ComfyUI-GGUF FLUX.2 file; returns the dequantized
    values by BFL name (what the file holds, as ``gguf.quants.dequantize`` reads it).

    ``types``: one type for the block weights, or a list cycled over them (a mixed file). ``vectors``:
    the type of 1-D tensors (ComfyUI-GGUF writes F32; "BF16" makes a file diffusers cannot run).
    """
    from .transformer import to_bfl

    rng = np.random.default_rng(seed)
    bfl = to_bfl({k: v.detach().float() for k, v in model.state_dict().items()})
    cycle = [types] if isinstance(types, str) or not isinstance(types, (list, tuple)) else list(types)
    entries, reference, i = [], {}, 0
    for name in sorted(bfl):
        values = bfl[name].numpy()
        choice = cycle[i % len(cycle)]
        t = transformer_type(name, values.shape, choice)
        if values.ndim == 1:
            t = vectors
        if t == _T(choice).name:
            i += 1
        stored, deq = encode(values, t, rng)
        entries.append((prefix + name, t, stored))
        reference[name] = torch.from_numpy(deq.copy())

    def configure(w):
        if is_distilled is not None:
            w.add_bool("is_distilled", is_distilled)

    _write(path, "flux", entries, configure)
    return reference


def dequantized_transformer(model, reference: dict[str, torch.Tensor]):
    """A copy of ``model`` (fp32) holding ``reference`` (BFL names), converted by diffusers' own FLUX.2 converter."""
    import copy

    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    ref = copy.deepcopy(model).float()
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(reference)), strict=True)
    return ref.eval()


# ----------------------------------------------------------------------------------------------
# Text encoders (llama.cpp layout)

# ComfyUI-GGUF's LLAMA_SD_MAP, written out per tensor: Hugging Face name -> llama.cpp name.
_HF_TO_LLAMA_CPP = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (conversion/llama.py), verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_cpp_name(hf: str) -> str | None:
    if hf == "embed_tokens.weight":
        return "token_embd.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    if hf == "norm.weight":
        return "output_norm.weight"
    parts = hf.split(".")
    if parts[0] == "layers":
        inner = ".".join(parts[2:-1])
        if inner in _HF_TO_LLAMA_CPP:
            return f"blk.{parts[1]}.{_HF_TO_LLAMA_CPP[inner]}.{parts[-1]}"
    return None


def save_tiny_text_encoder_gguf(model, tokenizer, path: str, *, arch: str, ggml_type="Q8_0", vocab: bool = True,
                                num_layers: int | None = None, seed: int = 0, head: bool = False) -> dict[str, torch.Tensor]:
    """Write a tiny Mistral3 / Qwen3 model as llama.cpp would (``arch`` "llama", "mistral3" or "qwen3").

    Returns the dequantized values by Hugging Face name without prefix (``layers.0.self_attn.q_proj.weight``),
    un-permuted: the model the file describes. ``vocab=False`` leaves the tokenizer out. ``head=True`` also
    writes the LM head (``output.weight``, in ``ggml_type``), as llama.cpp's conversions of whole models do;
    its values come back as ``lm_head.weight``.
    """
    import gguf

    from ..files.gguf_writer import add_tokenizer_metadata

    rng = np.random.default_rng(seed)
    family = "qwen3" if arch == "qwen3" else "mistral"
    config = model.config.text_config if hasattr(model.config, "text_config") else model.config
    prefix = "model.language_model." if family == "mistral" else "model."
    state = {k[len(prefix):]: v.detach().float() for k, v in model.state_dict().items() if k.startswith(prefix)}
    if head:
        state["lm_head.weight"] = model.lm_head.weight.detach().float()
    layers = num_layers or config.num_hidden_layers
    entries, reference = [], {}
    for hf in sorted(state):
        if hf.startswith("layers.") and int(hf.split(".")[1]) >= layers:
            continue
        name = llama_cpp_name(hf)
        if name is None:
            continue
        values = state[hf].numpy()
        t = "F32" if values.ndim == 1 else _T(ggml_type).name
        if t != "F32" and values.shape[-1] % gguf.GGML_QUANT_SIZES[_T(t)][0]:
            t = "F16"  # rows that do not split into whole blocks (llama.cpp falls back too)
        if arch != "qwen3" and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads
            kv = config.num_key_value_heads if ".attn_k." in name else heads
            stored, deq = encode(llama_cpp_permute(values, heads, kv), t, rng)
            inverse = np.argsort(llama_cpp_permute(np.arange(values.shape[0]), heads, kv))
            deq = deq[inverse]  # the file's rows, put back in Hugging Face order
        else:
            stored, deq = encode(values, t, rng)
        entries.append((name, t, stored))
        reference[hf] = torch.from_numpy(np.ascontiguousarray(deq))

    def configure(w):
        w.add_name("Mistral Small 3.2 24B Instruct 2506 (tiny)" if family == "mistral" else "Qwen3 4B (tiny)")
        w.add_block_count(layers)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_rope_dimension_count(config.head_dim)
        w.add_rope_freq_base(config.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        if vocab:
            add_tokenizer_metadata(w, tokenizer, family)

    _write(path, arch, entries, configure)
    return reference


def dequantized_text_model(model, reference: dict[str, torch.Tensor]):
    """A copy of the Hugging Face ``model`` whose language-model weights (and LM head, when the file has one) are
    ``reference`` (the GGUF's values)."""
    import copy

    ref = copy.deepcopy(model).float()
    prefix = "model.language_model." if hasattr(ref.config, "text_config") else "model."
    sd = ref.state_dict()
    for hf, value in reference.items():
        sd[hf if hf == "lm_head.weight" else prefix + hf] = value
    ref.load_state_dict(sd)
    return ref.eval()
