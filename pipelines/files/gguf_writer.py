"""Write FLUX.2 transformers and text encoders as GGUF (``flux2kit quantize --format gguf-q8_0``).

With ``gguf.GGUFWriter``, one tensor in memory at a time (tensor infos first, then each tensor is
read, quantized with ``gguf.quants.quantize`` and written); the file appears under its name only
when complete.

- Transformers in ComfyUI-GGUF's layout (its ``tools/convert.py`` plus the llama.cpp patch that
  quantizes, which the public FLUX.2 conversions use): architecture ``flux``, BFL names without a
  prefix, 1-D tensors and tensors of at most 1024 values in F32, the embedders and the final layer
  (``img_in``, ``txt_in``, ``time_in``, ``guidance_in``, ``vector_in``, ``final_layer``) in BF16,
  every other weight in the chosen type (F16 where rows do not split into whole blocks).
- Text encoders in llama.cpp's layout: architecture ``llama`` for Mistral (the one ComfyUI-GGUF
  reads too; newer llama.cpp writes ``mistral3`` for the same tensors) with its Q/K rows permuted as
  llama.cpp's ``LlamaModel`` does, ``qwen3`` for Qwen3; llama.cpp's names and metadata keys, the
  vocabulary as ``tokenizer.ggml.*``. Norms F32, the rest in the chosen type. The LM head is not
  written: FLUX.2 never uses it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import Flux2KitError
from .gguf_quants import can_quantize, quantize, type_by_name
from .gguf_text_encoder import hf_to_gguf_names, permute_rows
from .quantize import bfl_sources, canonical_sources
from .text_encoder_checkpoint import TEKKEN_KEY, config_record, find_tokenizer_dir, inspect_text_encoder, resolve_folders
from .tokenizers import load_tokenizer, tokenizer_from_gguf, tokenizer_from_tekken
from .transformer_checkpoint import inspect_transformer

# Never quantized by ComfyUI-GGUF's llama.cpp patch (tools/lcpp.patch, LLM_ARCH_FLUX): kept BF16.
TRANSFORMER_EDGE_LAYERS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
GGUF_FORMATS = ("Q8_0",)  # what `flux2kit quantize --format gguf-...` offers
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1"}


def transformer_tensor_type(name: str, shape, ggml_type):
    """The type ComfyUI-GGUF's conversion gives a FLUX transformer tensor (BFL ``name``) at ``ggml_type``."""
    import gguf

    T = gguf.GGMLQuantizationType
    n = int(np.prod(shape)) if shape else 1
    if len(shape) <= 1 or n <= 1024:
        return T.F32
    if name.startswith(TRANSFORMER_EDGE_LAYERS):
        return T.BF16
    return ggml_type if can_quantize(shape, ggml_type) else T.F16


def text_encoder_tensor_type(name: str, shape, ggml_type):
    """llama.cpp's type for a text-model tensor: F32 for norms (1-D), ``ggml_type`` for the rest (F16 fallback)."""
    import gguf

    if len(shape) <= 1:
        return gguf.GGMLQuantizationType.F32
    return ggml_type if can_quantize(shape, ggml_type) else gguf.GGMLQuantizationType.F16


def write_gguf(path: str | os.PathLike, arch: str, tensors: list[tuple], *, configure=None) -> str:
    """Stream ``tensors`` — ``(name, ggml type, shape, read)`` with ``read()`` giving floats — to a GGUF at ``path``.

    ``configure(writer)`` adds metadata (``writer.add_*``). Written to ``path + ".partial"`` and renamed
    at the end; on any failure nothing is left behind.
    """
    import gguf

    path = os.fspath(path)
    tmp = path + ".partial"
    writer = gguf.GGUFWriter(tmp, arch=arch)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if configure is not None:
            configure(writer)
        for name, ggml_type, shape, _ in tensors:
            if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if ggml_type == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(name, tuple(shape), np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(tuple(shape), ggml_type)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, ggml_type, shape, read in tensors:
            values = read()
            if tuple(values.shape) != tuple(shape):
                raise Flux2KitError(f"{name}: produced a tensor of shape {list(values.shape)}, not {list(shape)}; "
                                    "nothing was written.")
            writer.write_tensor_data(quantize(values, ggml_type))
            del values
        writer.close()
        os.replace(tmp, path)
    except BaseException as exc:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):  # disk full, read-only or missing folder: say so, not a traceback
            raise Flux2KitError(f"Could not write {path} ({exc.strerror or exc}); nothing was left behind. Free space "
                                "or choose another location.") from exc
        raise
    return path


def _file_type(writer, ggml_type) -> None:
    import gguf

    name = _FILE_TYPES.get(ggml_type.name)
    if name is not None:
        writer.add_file_type(int(gguf.LlamaFileType[name]))


# ----------------------------------------------------------------------------------------------
# Transformer


def save_gguf_transformer(src: str | os.PathLike, out: str | os.PathLike, *, ggml_type: str = "Q8_0") -> str:
    """Write the FLUX.2 transformer at ``src`` (any layout flux2kit loads) as a GGUF in ComfyUI-GGUF's layout."""
    qtype = type_by_name(ggml_type)
    ckpt = inspect_transformer(src)
    try:
        sources = bfl_sources(ckpt)
        tensors = [(name, transformer_tensor_type(name, info.shape, qtype), info.shape,
                    (lambda r=read: r().float()))
                   for name, (info, read, _) in sorted(sources.items())]

        def configure(writer):
            _file_type(writer, qtype)
            if getattr(ckpt, "distilled", None) is not None:  # [klein]: which model the tensors are
                writer.add_bool("is_distilled", bool(ckpt.distilled))
            writer.add_string("flux2kit.quantized_from", os.path.basename(os.fspath(src).rstrip("/")))

        return write_gguf(out, "flux", tensors, configure=configure)
    finally:
        ckpt.files.close()


# ----------------------------------------------------------------------------------------------
# Text encoders


def save_gguf_text_encoder(src: str | os.PathLike, out: str | os.PathLike, *, ggml_type: str = "Q8_0",
                           tokenizer: str | os.PathLike | None = None) -> str:
    """Write a FLUX.2 text encoder (folder or single file) as a llama.cpp GGUF carrying its vocabulary.

    The vocabulary comes from ``tokenizer`` (a folder), else from the source (its tokenizer folder or a
    Mistral file's tekken); a Qwen3 single file without either is written without one (as it came).
    """
    qtype = type_by_name(ggml_type)
    ckpt = inspect_text_encoder(src, tokenizer_given=True)
    try:
        tok = _source_tokenizer(ckpt, src, tokenizer)
        arch = "qwen3" if ckpt.family == "qwen3" else "llama"
        config = ckpt.config
        sources = canonical_sources(ckpt.files, ckpt.prefix)
        num_layers = 1 + max(int(n.split(".")[1]) for n in sources if n.startswith("layers."))
        names = hf_to_gguf_names(arch, num_layers)
        heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
        tensors = []
        for name, (info, read, _) in sorted(sources.items()):
            gguf_name = names.get("model." + name)
            if gguf_name is None:
                raise Flux2KitError(f"{ckpt.encoder_name}: no llama.cpp name for {name}; not written.")
            # llama.cpp's LlamaModel permutes Mistral's Q/K rows (Qwen3 is converted as is).
            head = next((h for k, h in heads.items() if f".{k}." in name), None) if arch == "llama" else None
            read_float = (lambda r=read, h=head: permute_rows(r().float(), h) if h else r().float())
            tensors.append((gguf_name, text_encoder_tensor_type(gguf_name, info.shape, qtype), info.shape, read_float))
        return write_gguf(out, arch, tensors, configure=lambda w: _text_metadata(w, arch, config, num_layers, qtype,
                                                                                    tok, ckpt.family))
    finally:
        ckpt.files.close()


def _source_tokenizer(ckpt, src, tokenizer):
    if tokenizer is not None:
        return load_tokenizer(os.fspath(tokenizer), ckpt.family)
    if not ckpt.single_file:
        return load_tokenizer(find_tokenizer_dir(resolve_folders(os.fspath(src))[1], ckpt.family), ckpt.family)
    if TEKKEN_KEY in ckpt.files:
        return tokenizer_from_tekken(ckpt.files.get(TEKKEN_KEY))
    if ckpt.gguf_tokenizer:
        return tokenizer_from_gguf(ckpt.source, ckpt.family)
    return None


def _text_metadata(writer, arch: str, config, num_layers: int, qtype, tok, family: str) -> None:
    record = config_record(config)
    head_dim = int(record["head_dim"])
    writer.add_name("Mistral-Small-3.x (FLUX.2 [dev] text encoder)" if family == "mistral"
                    else "Qwen3 (FLUX.2 [klein] text encoder)")
    _file_type(writer, qtype)
    writer.add_block_count(num_layers)
    writer.add_context_length(int(record.get("max_position_embeddings", 131072)))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(record["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(record["rms_norm_eps"]))
    writer.add_vocab_size(int(config.vocab_size))
    if tok is not None:
        add_tokenizer_metadata(writer, tok, family)


def add_tokenizer_metadata(writer, tok, family: str) -> None:
    """llama.cpp's ``tokenizer.ggml.*`` entries for a byte-level BPE Hugging Face tokenizer (Tekken, Qwen)."""
    import gguf

    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise Flux2KitError("Only byte-level BPE tokenizers (Mistral's Tekken, Qwen's) can be written into a GGUF.")
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for text, index in vocab.items():
        if index >= len(tokens):
            raise Flux2KitError("This tokenizer's ids have gaps; it cannot be written as a GGUF vocabulary.")
        tokens[index] = text
    added = {t["content"]: t for t in backend.get("added_tokens", [])}
    types = [int(gguf.TokenType.CONTROL) if added.get(t, {}).get("special") else
             int(gguf.TokenType.USER_DEFINED) if t in added else int(gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend.get("pre_tokenizer"), family))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                       ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        text = getattr(tok, token, None)
        if text is not None and text in vocab:
            add(vocab[text])
    writer.add_add_bos_token(False)  # FLUX.2's chat templates write the BOS themselves


def _pre_tokenizer_name(pre, family: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer's split: GPT-2's ByteLevel regex, else the family's."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "qwen2" if family == "qwen3" else "tekken"

