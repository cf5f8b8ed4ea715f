"""FLUX.2 text encoder checkpoints: what a Hugging Face folder or a ComfyUI single file holds, from its headers.

FLUX.2 [dev] conditions on the hidden states after decoder layers 10, 20 and 30 of the 40-layer
Mistral-Small-3.x language model; FLUX.2 [klein] on layers 9, 18 and 27 of Qwen3-4B / Qwen3-8B.

Two kinds of checkpoint:

- Hugging Face folders: a diffusers FLUX.2 root (``text_encoder/`` + ``tokenizer/``), a
  ``text_encoder/`` folder with a sibling ``tokenizer/``, or one folder with config, weights and
  tokenizer. The family comes from config.json (``model_type``).
- ComfyUI single files (``text_encoders/``): ``mistral_3_small_flux2_bf16.safetensors`` /
  ``_fp8.safetensors`` hold the language model under Llama-style names
  (``model.layers.N.self_attn.q_proj.weight``) and the tokenizer inside as ``tekken_model``, a
  uint8 tensor with Mistral's ``tekken.json``; pruned files keep only the first 30 layers.
  ``qwen_3_4b*.safetensors`` / ``qwen_3_8b*`` hold Qwen3 the same way (plus ``q_norm`` / ``k_norm``)
  and no tokenizer: ComfyUI uses the Qwen tokenizer it ships (``comfy/text_encoders/qwen25_tokenizer``,
  the same vocabulary as Qwen3's), so outside ComfyUI the caller passes a tokenizer folder.

FP8 layers use ComfyUI's formats as for the transformer (see fp8.py). Single files carry no config:
sizes come from tensor shapes, and what shapes cannot tell (Mistral's head_dim, RoPE theta, norm
eps) from the real models, unless a file written by flux2kit records them in its
``flux2kit.text_config`` metadata entry.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import Flux2KitError, UnsupportedFormatError
from .fp8 import LayerQuant, scan_quantization
from .gguf import GGUFFile, is_gguf
from .gguf_text_encoder import LlamaCppTextModel
from .safetensors import TensorFile, safetensors_files_in

HIDDEN_LAYERS = (10, 20, 30)  # [dev], Mistral-Small-3.x
QWEN3_HIDDEN_LAYERS = (9, 18, 27)  # [klein], Qwen3
FAMILY_LAYERS = {"mistral": HIDDEN_LAYERS, "qwen3": QWEN3_HIDDEN_LAYERS}
# What each encoder family conditions, for messages.
FAMILY_MODEL = {"mistral": "FLUX.2 [dev]", "qwen3": "FLUX.2 [klein]"}
FAMILY_NAME = {"mistral": "Mistral-Small-3.x", "qwen3": "Qwen3"}
TEKKEN_KEY = "tekken_model"
CONFIG_METADATA_KEY = "flux2kit.text_config"
COMFY_PREFIX = "model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Where the text model's tensors live, by checkpoint generation; longest first, since the
# shorter prefixes are prefixes of the longer ones.
_FOLDER_PREFIXES = (
    "model.language_model.model.",  # transformers 5.10-5.23 saved this duplicated path
    "language_model.model.model.",
    "language_model.model.",  # Mistral3 saved before transformers 4.52 (the layout of the hub repos)
    "model.language_model.",  # Mistral3 saved by transformers >= 4.52 / 5
    "model.",  # text-only MistralForCausalLM (e.g. pruned encoders)
    "",  # bare MistralModel
)
# Where a single file's language model may live; ComfyUI's own files use "model.".
_FILE_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
# What shapes cannot tell, from the real models (ComfyUI's Mistral3Small24BConfig / Qwen3_4BConfig).
_DEFAULTS = {
    "mistral": dict(head_dim=128, rope_theta=1_000_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "qwen3": dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960),
}


@dataclass
class TextEncoderCheckpoint:
    """What a text encoder checkpoint holds; no weights loaded. ``files`` reads its tensors."""

    files: object  # TensorFile, or a quantized view of one
    family: str  # "mistral" | "qwen3"
    prefix: str  # where the language model's tensors start ("model.", "model.language_model.", ...)
    config: object  # transformers MistralConfig / Qwen3Config of the language model in the checkpoint
    layers: dict[str, LayerQuant] = field(default_factory=dict)  # "layers.N.self_attn.q_proj" -> FP8 storage
    quantization: str = "none"
    source: str = ""  # the path given
    single_file: bool = False
    tokenizer_dir: str | None = None  # Hugging Face folders: where the tokenizer files are
    model_dir: str = ""  # Hugging Face folders: the folder holding config.json
    gguf_tokenizer: bool = False  # a GGUF file carrying its vocabulary (tokenizer.ggml.*)

    @property
    def encoder_name(self) -> str:
        """For messages: the file's name, or the folder holding config.json."""
        return self.files.name if self.single_file else self.model_dir

    @property
    def description(self) -> str:
        q = {"none": "bf16/fp32", "gguf": "GGUF"}.get(self.quantization, "FP8")
        if self.quantization == "gguf":  # the mix of the tensors FLUX.2 reads, e.g. "Q4_K x120, Q6_K x31, F32 x61"
            kept = [k for k in self.files.keys() if is_kept_key(k[len(self.prefix):], self.family)]
            q = ", ".join(f"{name} x{n}" for name, (n, _) in self.files.type_mix(kept).items())
        kind = ("GGUF file" if self.quantization == "gguf" else "ComfyUI single file") if self.single_file \
            else "Hugging Face folder"
        c = self.config
        return (f"{FAMILY_NAME[self.family]} text encoder, {kind}, {q}, {c.num_hidden_layers} layers, "
                f"width {c.hidden_size}")


def is_single_file(path: str | os.PathLike) -> bool:
    """True for a file (ComfyUI's text_encoders/*.safetensors), False for a Hugging Face folder."""
    return os.path.isfile(os.fspath(path))


def inspect_text_encoder(path: str | os.PathLike, *, tokenizer_given: bool = False) -> TextEncoderCheckpoint:
    """Identify a FLUX.2 text encoder (single file or Hugging Face folder) from its headers and config.

    A single file without its own tokenizer is refused here unless ``tokenizer_given``: the fix is to
    pass a tokenizer folder, so that is said before anything else.
    """
    path = os.fspath(path)
    if is_single_file(path) and is_gguf(path):
        return inspect_gguf_text_encoder(path, tokenizer_given=tokenizer_given)
    if is_single_file(path):
        files = TensorFile.open(path)
        _, family = _detect(files)
        if not tokenizer_given and TEKKEN_KEY not in files:  # before shape checks: the fix is to pass a folder
            files.close()
            raise missing_tokenizer_error(path, family)
        return inspect_text_encoder_file(path, files)
    return inspect_text_encoder_folder(path, find_tokenizer=not tokenizer_given)


def inspect_text_encoder_folder(path: str | os.PathLike, *, find_tokenizer: bool = True) -> TextEncoderCheckpoint:
    """A Hugging Face text encoder folder: config.json, safetensors weights, and where its tokenizer is."""
    model_dir, tokenizer_dirs = resolve_folders(os.fspath(path))
    family, config = read_text_config(model_dir)
    tokenizer_dir = find_tokenizer_dir(tokenizer_dirs, family) if find_tokenizer else None
    files = TensorFile.open(safetensors_files_in(model_dir, "model"))
    try:
        prefix = text_prefix(files, family)
        quantization, layers = scan_quantization(files, prefix)
    except BaseException:
        files.close()
        raise
    return TextEncoderCheckpoint(files=files, family=family, prefix=prefix, config=config, layers=layers,
                                 quantization=quantization, source=os.fspath(path), tokenizer_dir=tokenizer_dir,
                                 model_dir=model_dir)


def inspect_text_encoder_file(path: str | os.PathLike, files=None) -> TextEncoderCheckpoint:
    """Identify a single-file FLUX.2 text encoder from its header (names, shapes, metadata)."""
    path = os.fspath(path)
    files = files if files is not None else TensorFile.open(path)
    keys = files.keys()
    prefix, family = _detect(files)
    shape = lambda name: files.info(prefix + name).shape  # noqa: E731
    num_layers = 1 + max(int(m.group(1)) for k in keys if k.startswith(prefix) and (m := LAYER_KEY.match(k[len(prefix):])))
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
    config = language_config(family, vocab_size=vocab, hidden_size=hidden,
                             intermediate_size=shape("layers.0.mlp.gate_proj.weight")[0], num_hidden_layers=num_layers,
                             num_attention_heads=q_out // head_dim, num_key_value_heads=k_out // head_dim,
                             head_dim=head_dim, **values)
    quantization, layers = scan_quantization(files, prefix)
    return TextEncoderCheckpoint(files=files, family=family, prefix=prefix, config=config, layers=layers,
                                 quantization=quantization, source=path, single_file=True)


def language_config(family: str, *, rope_theta: float, **values):
    """The transformers config (MistralConfig / Qwen3Config) of a language model described by ``values``."""
    common = dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
                  **values)
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(attention_bias=False, **common)
    from transformers import MistralConfig

    return MistralConfig(sliding_window=None, **common)


def inspect_gguf_text_encoder(path: str | os.PathLike, *, tokenizer_given: bool = False) -> TextEncoderCheckpoint:
    """A llama.cpp GGUF of Mistral-Small-3.x ([dev]) or Qwen3 ([klein]), under Hugging Face names, from its header."""
    path = os.fspath(path)
    gguf_file = GGUFFile(path)
    try:
        files = LlamaCppTextModel(gguf_file)
        family = files.family
        if not tokenizer_given and not files.has_tokenizer:  # before shape checks: the fix is to pass a folder
            raise missing_tokenizer_error(path, family, gguf=True)
        values = files.config_values(_DEFAULTS[family])
        needed = max(FAMILY_LAYERS[family])
        if values["num_hidden_layers"] < needed:
            raise Flux2KitError(
                f"{files.name} holds {values['num_hidden_layers']} layers of a {FAMILY_NAME[family]} text encoder; "
                f"{FAMILY_MODEL[family]} reads the hidden states after layers "
                f"{', '.join(map(str, FAMILY_LAYERS[family]))}, so it needs at least {needed}. Use the full file."
            )
        files.check_supported([k for k in files.keys() if is_kept_key(k[len(COMFY_PREFIX):], family)
                               and k.startswith(COMFY_PREFIX)])
        config = language_config(family, **values)
    except BaseException:
        gguf_file.close()
        raise
    return TextEncoderCheckpoint(files=files, family=family, prefix=COMFY_PREFIX, config=config, quantization="gguf",
                                 source=path, single_file=True, gguf_tokenizer=files.has_tokenizer)


def is_kept_key(name: str, family: str) -> bool:
    """Whether a tensor name (without prefix) belongs to the part of the encoder FLUX.2 runs."""
    m = LAYER_KEY.match(name)
    if m:
        return int(m.group(1)) < max(FAMILY_LAYERS[family])
    return name.startswith("embed_tokens.")


def _detect(files) -> tuple[str, str]:
    """``(prefix, family)`` of a single-file encoder; closes ``files`` and raises if it is none."""
    prefix = next((p for p in _FILE_PREFIXES if f"{p}layers.0.input_layernorm.weight" in files), None)
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


def missing_tokenizer_error(path: str, family: str, *, gguf: bool = False) -> Flux2KitError:
    """The error for a single file without a tokenizer and none given: what to pass."""
    name = os.path.basename(path)
    if gguf:
        folder = ("the tokenizer/ folder of a FLUX.2 [klein] repository or of Qwen3-4B (inside ComfyUI flux2kit uses "
                  "ComfyUI's own qwen25_tokenizer)" if family == "qwen3" else
                  "the tokenizer/ folder of the FLUX.2 [dev] repository (Mistral-Small-3.x)")
        return Flux2KitError(
            f"{name} is a GGUF {FAMILY_NAME[family]} text encoder ({FAMILY_MODEL[family]}) without its tokenizer: its "
            f"metadata has no tokenizer.ggml.tokens (the vocabulary llama.cpp's converter writes). Pass a tokenizer "
            f"folder (tokenizer=... / --tokenizer), e.g. {folder}, or download a GGUF that carries its vocabulary."
        )
    if family == "qwen3":
        return Flux2KitError(
            f"{name} is a single file holding a Qwen3 text encoder ({FAMILY_MODEL['qwen3']}) and no tokenizer, as "
            "ComfyUI's qwen_3_*.safetensors files are. Inside ComfyUI flux2kit uses the tokenizer ComfyUI ships "
            "(comfy/text_encoders/qwen25_tokenizer); elsewhere pass a tokenizer folder (tokenizer=... / --tokenizer), "
            "e.g. the tokenizer/ folder of a FLUX.2 [klein] repository or of Qwen3-4B."
        )
    return Flux2KitError(
        f"{name} is a single file holding a Mistral text encoder but no tokenizer (ComfyUI's "
        f"mistral_3_small_flux2_*.safetensors carry it as {TEKKEN_KEY}). Download that file again, pass the tokenizer/ "
        "folder of FLUX.2 [dev] (tokenizer=... / --tokenizer), or load the Hugging Face folder instead of one of its files."
    )


# ----------------------------------------------------------------------------------------------
# Hugging Face folders


def resolve_folders(path: str) -> tuple[str, list[str]]:
    """The folder with config.json and the folders where the tokenizer may be, in order."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise Flux2KitError(f"Text encoder folder not found: {path}. Check the path.")
    if not os.path.isdir(path):
        raise Flux2KitError(
            f"{os.path.basename(path)} is a single file. This loader reads a Hugging Face folder: a FLUX.2 "
            "[dev] or [klein] repository (text_encoder/ + tokenizer/) or a folder with config.json, .safetensors "
            "weights and tokenizer files."
        )
    path = os.path.abspath(path)
    nested = os.path.join(path, "text_encoder")
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(nested, "config.json")):
        return nested, [os.path.join(path, "tokenizer"), nested]
    if os.path.exists(os.path.join(path, "config.json")):
        return path, [path, os.path.join(os.path.dirname(path), "tokenizer")]
    raise Flux2KitError(
        f"No config.json in {path} (nor in {nested}). Point to a FLUX.2 [dev] or [klein] model folder (with "
        "text_encoder/ and tokenizer/) or to a Mistral-Small-3.x or Qwen3 folder with config.json, .safetensors "
        "weights and tokenizer."
    )


def read_text_config(model_dir: str):
    """``(family, language-model config)`` after checking this is a usable FLUX.2 encoder."""
    config_path = os.path.join(model_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Flux2KitError(f"Cannot read {config_path}: {e}. Download the model's config.json again.") from None
    if not isinstance(raw, dict):
        raise Flux2KitError(f"{config_path} is not a model config.")
    model_type = str(raw.get("model_type", "")).lower()
    architectures = ", ".join(raw.get("architectures") or []) or model_type or "unknown"
    family = _family_of(model_type, architectures, model_dir)

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a config it cannot parse
        raise Flux2KitError(f"transformers cannot read {config_path} ({e}).") from None
    text_config = config.text_config if model_type == "mistral3" else config
    if family == "mistral" and getattr(text_config, "model_type", "") != "mistral":
        raise Flux2KitError(
            f"{model_dir} is a Mistral3 model whose language model is {text_config.model_type!r}, not Mistral. "
            "FLUX.2 [dev] needs Mistral-Small-3.x (Mistral3ForConditionalGeneration)."
        )
    hidden_layers = FAMILY_LAYERS[family]
    needed = max(hidden_layers)
    layers = int(text_config.num_hidden_layers)
    if layers < needed:
        usual = (
            "Use Mistral-Small-3.x (40 layers) or a pruned copy that keeps the first 30."
            if family == "mistral"
            else "Use Qwen3-4B or Qwen3-8B (36 layers), the encoders of FLUX.2 [klein] 4B and 9B."
        )
        raise Flux2KitError(
            f"The text encoder in {model_dir} has {layers} layers; {FAMILY_MODEL[family]} reads the hidden states "
            f"after layers {', '.join(map(str, hidden_layers))}, so it needs at least {needed}. {usual}"
        )
    return family, text_config


def _family_of(model_type: str, architectures: str, model_dir: str) -> str:
    if model_type in ("mistral3", "mistral"):
        return "mistral"
    if model_type == "qwen3":
        return "qwen3"
    if model_type.startswith("qwen"):
        raise Flux2KitError(
            f"{model_dir} holds a {architectures} model ({model_type}). FLUX.2 [klein] uses a dense Qwen3 text "
            "encoder (Qwen3ForCausalLM: Qwen3-4B for [klein] 4B, Qwen3-8B for [klein] 9B); use the text_encoder/ "
            "folder of the FLUX.2 [klein] repository."
        )
    if model_type in ("t5", "umt5", "mt5", "t5encoder", "clip", "clip_text_model", "llama", "gemma", "gemma2"):
        raise Flux2KitError(
            f"{model_dir} holds a {architectures} text encoder, not FLUX.2's. FLUX.2 [dev] needs Mistral-Small-3.x "
            "(Mistral3ForConditionalGeneration) and FLUX.2 [klein] needs Qwen3; T5 and CLIP belong to FLUX.1."
        )
    raise Flux2KitError(
        f"{model_dir} holds a {architectures} model. FLUX.2 [dev] needs Mistral-Small-3.x "
        "(Mistral3ForConditionalGeneration, text_encoder/ in the FLUX.2-dev repository); FLUX.2 [klein] needs "
        "Qwen3 (Qwen3ForCausalLM, text_encoder/ in a FLUX.2 [klein] repository)."
    )


def find_tokenizer_dir(candidates: list[str], family: str = "mistral") -> str:
    for folder in candidates:
        if os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, n)) for n in TOKENIZER_FILES):
            return folder
    raise Flux2KitError(
        "No tokenizer found for the text encoder; looked in "
        + " and ".join(dict.fromkeys(candidates))
        + f". Copy the tokenizer/ folder of the {FAMILY_MODEL[family]} repository (tokenizer.json, "
        "tokenizer_config.json) next to text_encoder/."
    )


def text_prefix(weights, family: str = "mistral") -> str:
    for prefix in _FOLDER_PREFIXES:
        if f"{prefix}embed_tokens.weight" in weights:
            return prefix
    sample = ", ".join(sorted(weights.keys())[:3])
    if family == "qwen3":
        raise Flux2KitError(
            f"{weights.name} does not hold a Qwen3 language model (no embed_tokens.weight; first keys: {sample}). "
            "FLUX.2 [klein] needs the Qwen3 text encoder weights."
        )
    raise Flux2KitError(
        f"{weights.name} does not hold a Mistral language model (no embed_tokens.weight; first keys: {sample}). "
        "FLUX.2 [dev] needs the Mistral-Small-3.x text encoder weights."
    )


def config_record(config) -> dict:
    """What shapes cannot tell about ``config``, for the ``flux2kit.text_config`` metadata entry."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    record = {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
              "rope_theta": theta, "rms_norm_eps": config.rms_norm_eps,
              "max_position_embeddings": config.max_position_embeddings}
    return {k: v for k, v in record.items() if v is not None}
