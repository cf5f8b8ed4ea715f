"""ComfyUI single-file text encoders: Mistral-Small-3.x ([dev]) and Qwen3 ([klein]), bf16 or FP8.

ComfyUI ships FLUX.2's encoders as one ``.safetensors`` file each (``text_encoders/``):

- ``mistral_3_small_flux2_bf16.safetensors`` / ``_fp8.safetensors``: the language model under
  Llama-style names (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
  ``model.norm.weight``), and the tokenizer inside as ``tekken_model``, a uint8 tensor holding
  Mistral's ``tekken.json``. Pruned files keep only the first 30 layers (all FLUX.2 reads).
- ``qwen_3_4b*.safetensors`` / ``qwen_3_8b*``: Qwen3 under the same names (plus ``q_norm`` /
  ``k_norm``), no tokenizer: ComfyUI uses the Qwen tokenizer it ships
  (``comfy/text_encoders/qwen25_tokenizer``, the same vocabulary as Qwen3's), so outside ComfyUI
  the caller passes a tokenizer folder.

FP8 files use ComfyUI's formats as for the transformer (``weight`` fp8 + ``weight_scale`` +
``comfy_quant`` / ``_quantization_metadata``, or legacy ``scaled_fp8``); those linears stay FP8 in
memory as :class:`~.fp8.FP8Linear`. The files carry no config: sizes come from tensor shapes, and
what shapes cannot tell (Mistral's head_dim, RoPE theta, norm eps) from the real models, unless a
file written by flux2kit records them in its ``flux2kit.text_config`` metadata entry.
"""

from __future__ import annotations

import base64
import copy
import gc
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .checkpoint_formats import LayerQuant, _scan_quantization
from .errors import Flux2KitError, UnsupportedFormatError, forget_locals
from .fp8 import FP8Linear
from .quantize import (
    QuantizedView,
    _add_quantized,
    _info,
    _LayerCache,
    _Source,
    is_quantizable_text_encoder_layer,
    quantization_metadata,
    write_safetensors,
)
from .safetensors_io import TensorFile, TensorInfo

TEKKEN_KEY = "tekken_model"
CONFIG_METADATA_KEY = "flux2kit.text_config"
COMFY_PREFIX = "model."
WEIGHT_MODES = ("as_stored", "dequantize", "quantize")
# Where a single file's language model may live; ComfyUI's own files use "model.".
_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
_LAYER = re.compile(r"^layers\.(\d+)\.")
# GPT-2's split pattern: what tokenizers' ByteLevel(use_regex=True) applies.
_BYTELEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# What shapes cannot tell, from the real models (ComfyUI's Mistral3Small24BConfig / Qwen3_4BConfig).
_DEFAULTS = {
    "mistral": dict(head_dim=128, rope_theta=1_000_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "qwen3": dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960),
}
# Qwen3's chat template reduced to what FLUX.2 [klein] renders (a user message, thinking off). Used
# when a tokenizer folder's template predates Qwen3, like ComfyUI's qwen25_tokenizer.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Tokens each family's chat format needs: a tokenizer without them belongs to another model.
_FAMILY_TOKENS = {"mistral": ("[INST]", "[/INST]", "[SYSTEM_PROMPT]"), "qwen3": ("<|im_start|>", "<|im_end|>")}


def is_single_file(path: str | os.PathLike) -> bool:
    """True for a file (ComfyUI's text_encoders/*.safetensors), False for a Hugging Face folder."""
    return os.path.isfile(os.fspath(path))


# ----------------------------------------------------------------------------------------------
# Tekken (Mistral's tokenizer file) <-> Hugging Face tokenizers


def tokenizer_from_tekken(data: bytes | torch.Tensor, *, chat_template: str | None = None):
    """A ``PreTrainedTokenizerFast`` from Mistral's tekken JSON (e.g. the ``tekken_model`` tensor).

    Ids are tekken's: special tokens at ``0..n-1`` (``<SPECIAL_i>`` fillers up to
    ``default_num_special_tokens``), then each vocabulary entry at rank + n, cut at
    ``default_vocab_size``. BPE merges are rebuilt from the ranks as tiktoken applies them (the
    pair whose merge has the lowest rank first), the split pattern is the file's own: the same
    conversion as transformers' ``MistralConverter``, without depending on its signature, which
    changed between transformers releases.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy().tobytes()
    try:
        raw = json.loads(data)
        config = raw["config"]
        pattern = config["pattern"]
        specials = sorted(raw.get("special_tokens") or [], key=lambda s: s["rank"])
        entries = raw["vocab"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise Flux2KitError(
            "The tekken_model tensor in this text encoder is not a Mistral tekken tokenizer (JSON with config, "
            "vocab, special_tokens): the file is damaged. Download the text encoder again."
        ) from None
    if [s["rank"] for s in specials] != list(range(len(specials))):
        raise Flux2KitError("The tekken tokenizer's special token ranks are not 0..n-1: the file is damaged.")
    n_special = int(config.get("default_num_special_tokens") or len(specials))
    special_strings = [str(s["token_str"]) for s in specials]
    special_strings += [f"<SPECIAL_{i}>" for i in range(len(special_strings), n_special)]
    vocab_size = config.get("default_vocab_size")
    if vocab_size is not None:
        entries = entries[: int(vocab_size) - n_special]
    ranks = {base64.b64decode(e["token_bytes"]): r for r, e in enumerate(entries)}

    byte_encoder = bytes_to_unicode()
    as_str = lambda b: "".join(byte_encoder[c] for c in b)  # noqa: E731
    vocab = {as_str(tok): rank + n_special for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        local = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        local.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, a, b) for a, b in local)
    merges.sort(key=lambda m: m[0])
    for i, s in enumerate(special_strings):
        vocab[s] = i

    tok = Tokenizer(BPE(vocab, [(as_str(a), as_str(b)) for _, a, b in merges], fuse_unk=False))
    if hasattr(tok.model, "ignore_merges"):
        tok.model.ignore_merges = True
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_strings])
    named = {name: s for name, s in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
                                     ("pad_token", "<pad>")) if s in special_strings}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="right", truncation_side="right", model_max_length=131072,
        chat_template=chat_template or mistral_chat_template(), **named,
    )


def mistral_chat_template() -> str:
    """Mistral-Small-3.x's chat template for system + user messages with list-of-parts content."""
    from .tiny.text_encoder import CHAT_TEMPLATE  # the template itself, kept in one place

    return CHAT_TEMPLATE


def tekken_from_tokenizer(tokenizer) -> bytes:
    """Mistral's tekken JSON for a byte-level BPE Hugging Face tokenizer whose special tokens come first.

    The inverse of :func:`tokenizer_from_tekken`: used to write ComfyUI's Mistral single file from a
    Hugging Face folder (ComfyUI reads the tokenizer only from ``tekken_model``).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise Flux2KitError("Only byte-level BPE tokenizers (Mistral's Tekken) can be written as a tekken_model.")
    pattern = _split_pattern(backend.get("pre_tokenizer"))
    specials = sorted((t["id"], t["content"]) for t in backend.get("added_tokens", []) if t.get("special"))
    n_special = len(specials)
    if [i for i, _ in specials] != list(range(n_special)):
        raise Flux2KitError("This tokenizer's special tokens are not ids 0..n-1, as Mistral's Tekken vocabulary has them.")
    decoder = {v: k for k, v in bytes_to_unicode().items()}
    items = sorted((i, s) for s, i in model["vocab"].items() if i >= n_special)
    vocab = []
    for rank, (i, s) in enumerate(items):
        if i != rank + n_special:
            raise Flux2KitError("This tokenizer's vocabulary has gaps after its special tokens; it is not a Tekken one.")
        vocab.append({"rank": rank, "token_bytes": base64.b64encode(bytes(decoder[c] for c in s)).decode("ascii"),
                      "token_str": None})
    raw = {
        "config": {"pattern": pattern, "num_vocab_tokens": len(vocab), "default_vocab_size": len(vocab) + n_special,
                   "default_num_special_tokens": n_special, "version": "v7"},
        "vocab": vocab,
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in specials],
    }
    return json.dumps(raw, ensure_ascii=False).encode("utf-8")


def _split_pattern(pre: dict | None) -> str:
    if not pre:
        raise Flux2KitError("This tokenizer has no pre-tokenizer; a Tekken vocabulary needs a split pattern.")
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True):
            return _BYTELEVEL_PATTERN
    if pre.get("type") == "Split":
        pattern = pre.get("pattern", {})
        return pattern.get("Regex") or re.escape(pattern.get("String", ""))
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            if p.get("type") in ("Split",) or (p.get("type") == "ByteLevel" and p.get("use_regex", True)):
                return _split_pattern(p)
    raise Flux2KitError(f"Cannot read the split pattern of this tokenizer's pre-tokenizer ({pre.get('type')}).")


# ----------------------------------------------------------------------------------------------
# Inspection


@dataclass
class TextEncoderFile:
    """What a single-file text encoder's header says; no weights loaded."""

    files: object  # TensorFile or QuantizedView
    family: str  # "mistral" | "qwen3"
    prefix: str
    config: object  # transformers MistralConfig / Qwen3Config of the layers in the file
    layers: dict[str, LayerQuant] = field(default_factory=dict)  # "layers.N.self_attn.q_proj" -> storage
    quantization: str = "none"

    @property
    def description(self) -> str:
        name = {"mistral": "Mistral-Small-3.x", "qwen3": "Qwen3"}[self.family]
        q = "bf16/fp32" if self.quantization == "none" else "FP8"
        c = self.config
        return f"{name} text encoder, ComfyUI single file, {q}, {c.num_hidden_layers} layers, width {c.hidden_size}"


def inspect_text_encoder_file(path: str | os.PathLike, files=None) -> TextEncoderFile:
    """Identify a single-file FLUX.2 text encoder from its header (names, shapes, metadata)."""
    from .text_encoder import FAMILY_LAYERS, FAMILY_MODEL

    path = os.fspath(path)
    files = files if files is not None else TensorFile.open(path)
    keys = files.keys()
    prefix, family = _detect(files)
    shape = lambda name: files.info(prefix + name).shape  # noqa: E731
    num_layers = 1 + max(int(m.group(1)) for k in keys if k.startswith(prefix) and (m := _LAYER.match(k[len(prefix):])))
    needed = max(FAMILY_LAYERS[family])
    if num_layers < needed:
        files.close()
        raise Flux2KitError(
            f"{files.name} holds {num_layers} layers of a {'Mistral' if family == 'mistral' else 'Qwen3'} text encoder; "
            f"{FAMILY_MODEL[family]} reads the hidden states after layers {', '.join(map(str, FAMILY_LAYERS[family]))}, "
            f"so it needs at least {needed}. Use the full file (or a pruned one that keeps the first {needed} layers)."
        )
    values = dict(_DEFAULTS[family])
    if family == "qwen3":
        values["head_dim"] = shape("layers.0.self_attn.q_norm.weight")[0]
    values.update(_metadata_config(files))
    head_dim = int(values.pop("head_dim"))
    vocab, hidden = shape("embed_tokens.weight")
    q_out, k_out = shape("layers.0.self_attn.q_proj.weight")[0], shape("layers.0.self_attn.k_proj.weight")[0]
    if q_out % head_dim or k_out % head_dim:
        raise UnsupportedFormatError(
            f"{files.name}: attention widths {q_out}/{k_out} are not multiples of head_dim {head_dim}; this is not "
            "Mistral-Small-3.x or Qwen3 as FLUX.2 uses them."
        )
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=shape("layers.0.mlp.gate_proj.weight")[0],
                  num_hidden_layers=num_layers, num_attention_heads=q_out // head_dim,
                  num_key_value_heads=k_out // head_dim, head_dim=head_dim, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": float(values.pop("rope_theta"))}, **values)
    if family == "qwen3":
        from transformers import Qwen3Config

        config = Qwen3Config(attention_bias=False, **common)
    else:
        from transformers import MistralConfig

        config = MistralConfig(sliding_window=None, **common)
    quantization, layers = _scan_quantization(files, prefix)
    return TextEncoderFile(files=files, family=family, prefix=prefix, config=config, layers=layers,
                           quantization=quantization)


def _detect(files) -> tuple[str, str]:
    """``(prefix, family)`` of a single-file encoder; closes ``files`` and raises if it is none."""
    prefix = next((p for p in _PREFIXES if f"{p}layers.0.input_layernorm.weight" in files), None)
    if prefix is None or f"{prefix}embed_tokens.weight" not in files:
        files.close()
        raise _not_an_encoder_error(files.name, files.keys())
    return prefix, "qwen3" if f"{prefix}layers.0.self_attn.q_norm.weight" in files else "mistral"


def _metadata_config(files) -> dict:
    raw = files.metadata.get(CONFIG_METADATA_KEY)
    if not raw:
        return {}
    try:
        values = json.loads(raw)
    except ValueError:
        raise Flux2KitError(f"{files.name}: the {CONFIG_METADATA_KEY} metadata is not JSON; the file is damaged.") from None
    return {k: v for k, v in values.items() if k in ("head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings")}


def _not_an_encoder_error(name: str, keys: list[str]) -> Flux2KitError:
    joined = "\n".join(keys[:2000])
    if "double_blocks." in joined or "transformer_blocks." in joined:
        what, hint = "a FLUX transformer", "Load it with the transformer loader (models/diffusion_models)."
    elif "encoder.block." in joined:
        what, hint = "a T5 text encoder (FLUX.1)", "FLUX.2 [dev] needs Mistral-Small-3.x; [klein] needs Qwen3."
    elif "text_model.encoder.layers" in joined:
        what, hint = "a CLIP text encoder (FLUX.1 / SD)", "FLUX.2 [dev] needs Mistral-Small-3.x; [klein] needs Qwen3."
    elif "decoder.conv_in" in joined or "encoder.down" in joined:
        what, hint = "a VAE", "Load it with the VAE loader."
    else:
        what, hint = "not a FLUX.2 text encoder", (
            "Use mistral_3_small_flux2_bf16/fp8.safetensors (FLUX.2 [dev]) or qwen_3_4b/8b*.safetensors ([klein]).")
    return Flux2KitError(f"{name} is {what}, not a FLUX.2 text encoder. {hint}")


# ----------------------------------------------------------------------------------------------
# Loading


def load_text_encoder_file(
    path: str | os.PathLike,
    *,
    device="cpu",
    dtype: torch.dtype | str | None = None,
    tokenizer: str | os.PathLike | None = None,
    weights: str = "as_stored",
):
    """Load a ComfyUI single-file FLUX.2 text encoder (Mistral-Small-3.x or Qwen3; bf16 or FP8).

    ``tokenizer``: a tokenizer folder. Mistral files carry theirs (``tekken_model``); a folder given
    here replaces it. Qwen3 files need one (inside ComfyUI the loader node passes ComfyUI's own).
    ``weights``: ``as_stored`` keeps FP8 layers FP8, ``dequantize`` expands them to ``dtype``,
    ``quantize`` also turns bf16 linears into FP8 (exactly as ``save_text_encoder_file(quantize=True)``).
    """
    from .text_encoder import Flux2TextEncoder, _resolve_dtype

    if weights not in WEIGHT_MODES:
        raise Flux2KitError(f"Unknown weight mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}.")
    path = os.fspath(path)
    device = torch.device(device)
    dtype = _resolve_dtype(dtype, device)
    files = TensorFile.open(path)
    _, family = _detect(files)
    if tokenizer is None and TEKKEN_KEY not in files:  # before shape checks: the fix is to pass a folder
        files.close()
        _missing_tokenizer(path, family)
    info = inspect_text_encoder_file(path, files)
    model = None
    try:
        tok = _tokenizer_for(info, tokenizer, path)
        if weights == "quantize":
            info = quantized_text_encoder_file(info)
            weights = "as_stored"
        model = build_text_model(info, device=device, dtype=dtype, weights=weights)
        return Flux2TextEncoder(model, tok, family=info.family)
    except BaseException as exc:
        del model
        forget_locals(exc)
        gc.collect()
        raise
    finally:
        info.files.close()


def load_text_encoder_folder_quantized(path: str | os.PathLike, *, device="cpu", dtype=None):
    """A Hugging Face text encoder folder with its decoder linears quantized to FP8 while loading.

    The tensors are those of ``save_text_encoder_file(path, quantize=True)``: per-tensor e4m3fn.
    """
    from .safetensors_io import safetensors_files_in
    from .text_encoder import (
        Flux2TextEncoder,
        _find_tokenizer_dir,
        _load_tokenizer,
        _read_text_config,
        _resolve_dtype,
        _resolve_folders,
        _text_prefix,
    )

    device = torch.device(device)
    dtype = _resolve_dtype(dtype, device)
    model_dir, tokenizer_dirs = _resolve_folders(os.fspath(path))
    family, config = _read_text_config(model_dir)
    tok = _load_tokenizer(_find_tokenizer_dir(tokenizer_dirs, family), family)
    files = TensorFile.open(safetensors_files_in(model_dir, "model"))
    info = None
    model = None
    try:
        quantization, layers = _scan_quantization(files, _text_prefix(files, family))
        info = TextEncoderFile(files=files, family=family, prefix=_text_prefix(files, family), config=config,
                               layers=layers, quantization=quantization)
        check_tokenizer_matches(tok, info, model_dir)
        info = quantized_text_encoder_file(info)
        model = build_text_model(info, device=device, dtype=dtype)
        return Flux2TextEncoder(model, tok, family=family)
    except BaseException as exc:
        del model
        forget_locals(exc)
        gc.collect()
        raise
    finally:
        (info.files if info is not None else files).close()


def _tokenizer_for(info: TextEncoderFile, folder, path: str):
    from .text_encoder import _load_tokenizer

    name = os.path.basename(path)
    if folder is not None:
        if not os.path.isdir(os.fspath(folder)):
            raise Flux2KitError(f"Tokenizer folder not found: {folder}. Give a folder with tokenizer.json or "
                                "vocab.json + merges.txt and tokenizer_config.json.")
        tok = _load_tokenizer(os.fspath(folder), info.family)
        where = os.fspath(folder)
    elif TEKKEN_KEY in info.files:
        tok = tokenizer_from_tekken(info.files.get(TEKKEN_KEY))
        where = f"the {TEKKEN_KEY} tensor of {name}"
    else:
        _missing_tokenizer(path, info.family)
    if info.family == "qwen3" and "enable_thinking" not in (tok.chat_template or ""):
        tok.chat_template = QWEN3_CHAT_TEMPLATE  # e.g. ComfyUI's qwen25_tokenizer: same vocabulary, older template
    check_tokenizer_matches(tok, info, where)
    return tok


def _missing_tokenizer(path: str, family: str):
    from .text_encoder import FAMILY_MODEL

    name = os.path.basename(path)
    if family == "qwen3":
        raise Flux2KitError(
            f"{name} is a single file holding a Qwen3 text encoder ({FAMILY_MODEL['qwen3']}) and no tokenizer, as "
            "ComfyUI's qwen_3_*.safetensors files are. Inside ComfyUI flux2kit uses the tokenizer ComfyUI ships "
            "(comfy/text_encoders/qwen25_tokenizer); elsewhere pass a tokenizer folder (tokenizer=... / --tokenizer), "
            "e.g. the tokenizer/ folder of a FLUX.2 [klein] repository or of Qwen3-4B."
        )
    raise Flux2KitError(
        f"{name} is a single file holding a Mistral text encoder but no tokenizer (ComfyUI's "
        f"mistral_3_small_flux2_*.safetensors carry it as {TEKKEN_KEY}). Download that file again, pass the tokenizer/ "
        "folder of FLUX.2 [dev] (tokenizer=... / --tokenizer), or load the Hugging Face folder instead of one of its files."
    )


def check_tokenizer_matches(tok, info: TextEncoderFile, where: str) -> None:
    """Refuse a tokenizer whose vocabulary is not the encoder's (embedding rows, chat tokens)."""
    check_tokenizer_belongs(tok, info.family, int(info.config.vocab_size), info.files.name, where)


def check_tokenizer_belongs(tok, family: str, rows: int, encoder: str, where: str) -> None:
    """``check_tokenizer_matches`` for any encoder: ``rows`` embedding rows, named ``encoder`` in messages."""
    from .text_encoder import check_tokenizer_fits

    check_tokenizer_fits(tok, rows, encoder)
    size = len(tok)
    vocab = tok.get_vocab()
    missing = [t for t in _FAMILY_TOKENS[family] if t not in vocab]
    # Embedding tables are padded a little (Qwen3: 151936 rows for 151669 tokens), never by thousands.
    if missing or rows - size > 1024:
        why = f"it lacks {', '.join(missing)}" if missing else f"it has {size} tokens for {rows} embedding rows"
        raise Flux2KitError(
            f"The tokenizer from {where} does not match the text encoder {encoder}: {why}. They belong to "
            "different models. Use the tokenizer that ships with this text encoder "
            f"({'its tekken_model' if family == 'mistral' else 'Qwen3 / ComfyUI qwen25_tokenizer'})."
        )


def build_text_model(info: TextEncoderFile, *, device, dtype, weights: str = "as_stored") -> nn.Module:
    """The language model trimmed to the layers FLUX.2 reads, built on meta and streamed from ``info.files``.

    FP8 layers become FP8Linear (``weights="as_stored"``) or are dequantized to ``dtype``.
    """
    from .text_encoder import FAMILY_LAYERS

    if info.family == "qwen3":
        from transformers import Qwen3Model as TextModel
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as RotaryEmbedding
    else:
        from transformers import MistralModel as TextModel
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding as RotaryEmbedding

    num_layers = max(FAMILY_LAYERS[info.family])
    config = copy.deepcopy(info.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    with torch.device("meta"):
        model = TextModel(config)
    model.norm = nn.Identity()  # the final norm follows the last layer of the full model, not ours
    model.rotary_emb = RotaryEmbedding(config=config).to(device)
    wanted = {layer: q for layer, q in info.layers.items() if _kept(layer, num_layers)}
    if weights == "as_stored":
        for layer, q in wanted.items():
            linear = model.get_submodule(layer)
            _set_module(model, layer, FP8Linear(
                linear.in_features, linear.out_features, bias=linear.bias is not None, weight_dtype=q.dtype,
                per_row=q.per_row, has_input_scale=q.has_input_scale, compute_dtype=dtype, device="meta"))

    files, prefix = info.files, info.prefix
    unknown = []
    for key in files.keys():
        if not key.startswith(prefix) or key == TEKKEN_KEY:
            continue
        name = key[len(prefix):]
        layer, _, param = name.rpartition(".")
        if not _kept(layer, num_layers) or param in ("comfy_quant", "scale_input") or name.endswith("scaled_fp8"):
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        q = wanted.get(layer)
        if q is not None and param in ("weight_scale", "scale_weight", "input_scale"):
            continue  # read with the weight
        if q is not None and param == "weight":
            _load_fp8_layer(model, files, prefix, layer, q, weights=weights, dtype=dtype, device=device)
            continue
        try:
            target = model.get_submodule(layer)
        except AttributeError:
            unknown.append(key)
            continue
        if param not in target._parameters:
            unknown.append(key)
            continue
        t = files.get(key)
        if tuple(t.shape) != tuple(target._parameters[param].shape):
            raise Flux2KitError(f"{key} in {files.name} has shape {list(t.shape)}, expected "
                                f"{list(target._parameters[param].shape)}: the file is damaged or not this model.")
        target._parameters[param] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
    if unknown:
        raise UnsupportedFormatError(
            f"{files.name} has tensors a plain {'Mistral' if info.family == 'mistral' else 'Qwen3'} layer does not "
            f"have (e.g. {unknown[0]}): an adapter or an unsupported quantization. Use ComfyUI's bf16 or FP8 file."
        )
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise Flux2KitError(
            f"{files.name} is incomplete: {len(missing)} tensors FLUX.2 needs are missing (e.g. {prefix}{missing[0]}). "
            "The download may not have finished; download it again."
        )
    return model.eval().requires_grad_(False)


def _kept(layer: str, num_layers: int) -> bool:
    """Whether a module path (without prefix) is part of the trimmed model FLUX.2 reads."""
    m = _LAYER.match(layer + ".")
    if m:
        return int(m.group(1)) < num_layers
    return layer == "embed_tokens"


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _load_fp8_layer(model, files, prefix, layer, q: LayerQuant, *, weights, dtype, device) -> None:
    full = prefix + layer
    w = files.get(f"{full}.weight")
    if w.dtype == torch.uint8:
        w = w.view(q.dtype)
    scale_key = next((f"{full}.{s}" for s in ("weight_scale", "scale_weight") if f"{full}.{s}" in files), None)
    scale = files.get(scale_key).float() if scale_key else torch.ones((), dtype=torch.float32)
    scale = scale.reshape(-1) if q.per_row else scale.reshape(())
    module = model.get_submodule(layer)
    if weights == "dequantize":
        dense = (w.float() * (scale[:, None] if q.per_row else scale)).to(device=device, dtype=dtype)
        module._parameters["weight"] = nn.Parameter(dense, requires_grad=False)
        return
    module._buffers["weight"] = w.to(device=device, dtype=q.dtype)
    module._buffers["weight_scale"] = scale.to(device)
    if q.has_input_scale:
        module._buffers["input_scale"] = files.get(f"{full}.input_scale").float().reshape(()).to(device)


# ----------------------------------------------------------------------------------------------
# Quantizing and saving in ComfyUI's single-file form


def _canonical_sources(files, prefix: str) -> dict[str, tuple[TensorInfo, Callable[[], torch.Tensor], LayerQuant | None]]:
    """Language-model tensors by name without prefix (``layers.0.mlp.up_proj.weight`` ...), FP8 side tensors folded in."""
    _, layers = _scan_quantization(files, prefix)
    out = {}
    for key, info in files.items_info():
        if not key.startswith(prefix) or key == TEKKEN_KEY:
            continue
        name = key[len(prefix):]
        layer, _, param = name.rpartition(".")
        if not (_LAYER.match(name) or name.startswith(("embed_tokens.", "norm."))):
            continue  # vision tower, projector, LM head
        if param in ("weight_scale", "input_scale", "scale_weight", "scale_input", "comfy_quant") or \
                name.endswith("scaled_fp8") or name.endswith("rotary_emb.inv_freq"):
            continue
        q = layers.get(layer) if param == "weight" else None
        if q is None:
            out[name] = (info, (lambda k=key: files.get(k)), None)
            continue
        scale_key = next((f"{prefix}{layer}.{s}" for s in ("weight_scale", "scale_weight")
                          if f"{prefix}{layer}.{s}" in files), None)

        def read(k=key, sk=scale_key, q=q):
            w = files.get(k)
            w = (w.view(q.dtype) if w.dtype == torch.uint8 else w).float()
            if sk is not None:
                s = files.get(sk).float()
                w = w * (s.reshape(-1, 1) if q.per_row else s.reshape(()))
            return w

        out[name] = (TensorInfo("F32", info.shape), read, q)
    return out


def text_encoder_view(files, prefix: str, *, quantize: bool, extra: dict[str, _Source] | None = None,
                      metadata: dict[str, str] | None = None) -> QuantizedView:
    """The ComfyUI single file for a language model in ``files`` (keys ``model.*``), as a lazy view.

    With ``quantize`` the decoder-layer linears are FP8 (per-tensor e4m3fn, ``comfy_quant``);
    layers stored as FP8 in the source are dequantized and re-quantized the same way.
    """
    sources: dict[str, _Source] = {}
    cache = _LayerCache()
    for name, (info, read, q) in _canonical_sources(files, prefix).items():
        layer, _, param = name.rpartition(".")
        if param == "weight" and len(info.shape) == 2 and (q is not None or (
                quantize and is_quantizable_text_encoder_layer(layer))):
            _add_quantized(sources, cache, COMFY_PREFIX + layer, info.shape, read)
            continue
        sources[COMFY_PREFIX + name] = _Source(info, read)
    sources.update(extra or {})
    return QuantizedView(name=files.name, sources=dict(sorted(sources.items())), metadata=dict(metadata or {}),
                         closers=[files.close])


def quantized_text_encoder_file(info: TextEncoderFile) -> TextEncoderFile:
    """``info`` as the FP8 single file ``save_text_encoder_file(quantize=True)`` writes, read lazily."""
    view = text_encoder_view(info.files, info.prefix, quantize=True)
    q = LayerQuant(dtype=torch.float8_e4m3fn, per_row=False, has_scale=True, has_input_scale=False)
    layers = {k[len(COMFY_PREFIX): -len(".comfy_quant")]: q for k in view.keys() if k.endswith(".comfy_quant")}
    return TextEncoderFile(files=view, family=info.family, prefix=COMFY_PREFIX, config=info.config, layers=layers,
                           quantization="comfy-fp8")


def save_text_encoder_file(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quantize: bool = True,
    tokenizer: str | os.PathLike | None = None,
    header_metadata: bool = True,
) -> str:
    """Write a FLUX.2 text encoder as a ComfyUI single file (FP8 with ``quantize``, else as stored).

    ``src``: a single file, or a Hugging Face folder (its tokenizer becomes the Mistral file's
    ``tekken_model``; ComfyUI's Qwen3 files carry no tokenizer). All layers of the source are written.
    """
    src = os.fspath(src)
    tekken = None
    if is_single_file(src):
        info = inspect_text_encoder_file(src)
        files, prefix, family, config = info.files, info.prefix, info.family, info.config
        if family == "mistral":
            if tokenizer is not None:
                from .text_encoder import _load_tokenizer

                tekken = tekken_from_tokenizer(_load_tokenizer(os.fspath(tokenizer), family))
            elif TEKKEN_KEY in files:
                tekken = files.get(TEKKEN_KEY).numpy().tobytes()
    else:
        from .text_encoder import (
            _find_tokenizer_dir,
            _load_tokenizer,
            _read_text_config,
            _resolve_folders,
            _text_prefix,
        )
        from .safetensors_io import safetensors_files_in

        model_dir, tokenizer_dirs = _resolve_folders(src)
        family, config = _read_text_config(model_dir)
        files = TensorFile.open(safetensors_files_in(model_dir, "model"))
        prefix = _text_prefix(files, family)
        if family == "mistral":
            tok_dir = os.fspath(tokenizer) if tokenizer is not None else _find_tokenizer_dir(tokenizer_dirs, family)
            tekken = tekken_from_tokenizer(_load_tokenizer(tok_dir, family))
    return write_comfy_text_encoder(files, prefix, config, out, quantize=quantize, tekken=tekken,
                                    header_metadata=header_metadata)


def write_comfy_text_encoder(files, prefix: str, config, out, *, quantize: bool, tekken: bytes | None = None,
                             header_metadata: bool = True) -> str:
    """Stream the language model in ``files`` (under ``prefix``) to ``out`` as a ComfyUI single file."""
    extra = {}
    if tekken is not None:
        data = torch.frombuffer(bytearray(tekken), dtype=torch.uint8)
        extra[TEKKEN_KEY] = _Source(_info(torch.uint8, data.shape), lambda: data)
    metadata = {CONFIG_METADATA_KEY: json.dumps(_config_record(config))}
    with text_encoder_view(files, prefix, quantize=quantize, extra=extra) as view:
        if header_metadata and any(k.endswith(".comfy_quant") for k in view.keys()):
            metadata["_quantization_metadata"] = quantization_metadata(view)
        write_safetensors(out, view, metadata=metadata)
    return os.fspath(out)


class StateDictFiles:
    """An in-memory state dict seen as a TensorFile (``keys``/``info``/``get``), for writers."""

    def __init__(self, state: dict[str, torch.Tensor], name: str = "<state dict>"):
        from .quantize import _ST_DTYPES

        self.state, self.name, self.metadata = state, name, {}
        self._infos = {k: TensorInfo(_ST_DTYPES[v.dtype], tuple(v.shape)) for k, v in state.items()}

    def keys(self):
        return list(self.state)

    def __contains__(self, key):
        return key in self.state

    def info(self, key):
        return self._infos[key]

    def items_info(self):
        return iter(self._infos.items())

    def get(self, key):
        return self.state[key]

    def close(self):
        pass


def _config_record(config) -> dict:
    """What shapes cannot tell about ``config``, for the ``flux2kit.text_config`` metadata entry."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    record = {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
              "rope_theta": theta, "rms_norm_eps": config.rms_norm_eps,
              "max_position_embeddings": config.max_position_embeddings}
    return {k: v for k, v in record.items() if v is not None}
