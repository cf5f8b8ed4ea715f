"""FLUX.2 prompt encoding: Mistral-Small-3.x for [dev], Qwen3 for [klein], loaded lean.

FLUX.2 [dev] conditions on the hidden states after decoder layers 10, 20 and 30 of the 40-layer
Mistral-Small-3.x language model, stacked per token into (B, 512, 3 * hidden). FLUX.2 [klein]
does the same with layers 9, 18 and 27 of Qwen3-4B / Qwen3-8B (36 layers). Later layers, the
final norm, the LM head, the vision tower and the projector never influence those numbers, so
this loader builds only the embedding and the layers that are read, on the meta device, and
streams their tensors one at a time from safetensors: the skipped parts are never read.

The encoding reproduces diffusers: ``Flux2Pipeline._get_mistral_3_small_prompt_embeds`` (BFL's
system message, list-of-parts content, the tokenizer's own chat template, padding to 512,
truncation, the attention mask) and ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` (the prompt
as the only user message, generation prompt with thinking disabled, padding to 512).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from .devices import default_dtype
from .errors import Flux2KitError, UnsupportedFormatError
from .safetensors_io import TensorFile, safetensors_files_in

logger = logging.getLogger("flux2kit")

# Black Forest Labs' system message for [dev] (flux2 repo, system_messages.py); the line break
# after "object" is part of the original and changes the tokens.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)
HIDDEN_LAYERS = (10, 20, 30)  # [dev], Mistral-Small-3.x
QWEN3_HIDDEN_LAYERS = (9, 18, 27)  # [klein], Qwen3
MAX_LENGTH = 512
FAMILY_LAYERS = {"mistral": HIDDEN_LAYERS, "qwen3": QWEN3_HIDDEN_LAYERS}
# What each encoder family conditions, for messages.
FAMILY_MODEL = {"mistral": "FLUX.2 [dev]", "qwen3": "FLUX.2 [klein]"}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Where the text model's tensors live, by checkpoint generation; longest first, since the
# shorter prefixes are prefixes of the longer ones.
_TEXT_PREFIXES = (
    "model.language_model.model.",  # transformers 5.10-5.23 saved this duplicated path
    "language_model.model.model.",
    "language_model.model.",  # Mistral3 saved before transformers 4.52 (the layout of the hub repos)
    "model.language_model.",  # Mistral3 saved by transformers >= 4.52 / 5
    "model.",  # text-only MistralForCausalLM (e.g. pruned encoders)
    "",  # bare MistralModel
)
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


@dataclass
class PromptEmbeds:
    """Prompt embeddings for the FLUX.2 transformer, with what the tokenizer saw."""

    embeds: torch.Tensor  # (B, 512, 3 * hidden)
    prompts: list[str]
    token_counts: list[int]  # tokens of the full chat sequence before padding/truncation
    truncated: list[bool]  # True where the sequence was cut at max_length
    family: str = ""  # the encoder's: "mistral" ([dev]) or "qwen3" ([klein])
    # [klein]: the empty prompt's embeddings, the negative of base's classifier-free guidance
    negative: torch.Tensor | None = None


def format_messages(prompts: list[str], system_message: str = SYSTEM_MESSAGE) -> list[list[dict]]:
    """The chat conversations FLUX.2 [dev] encodes: the system message, then the prompt as user text."""
    # diffusers/BFL strip [IMG] so a Pixtral processor does not look for images that are not there.
    return [
        [
            {"role": "system", "content": [{"type": "text", "text": system_message}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
        ]
        for prompt in prompts
    ]


def qwen3_chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    """The chat text FLUX.2 [klein] encodes per prompt: the prompt as the only user message, thinking off."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for prompt in prompts
    ]


class Flux2TextEncoder:
    """A FLUX.2 text encoder trimmed to the layers FLUX.2 reads; ``encode`` turns prompts into embeddings.

    ``family`` is ``"mistral"`` (Mistral-Small-3.x, FLUX.2 [dev]) or ``"qwen3"`` (FLUX.2 [klein]).
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, hidden_layers=None, max_length=MAX_LENGTH, family: str = "mistral"
    ):
        if family not in FAMILY_LAYERS:
            raise ValueError(f"family must be one of {sorted(FAMILY_LAYERS)}, not {family!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.hidden_layers = tuple(hidden_layers or FAMILY_LAYERS[family])
        self.max_length = max_length
        self.hidden_size = int(model.config.hidden_size)
        self.embed_dim = len(self.hidden_layers) * self.hidden_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._negative: dict[torch.dtype, PromptEmbeds] = {}

    @property
    def model_name(self) -> str:
        """The FLUX.2 model this encoder belongs to, for messages."""
        return FAMILY_MODEL[self.family]

    @property
    def uses_negative_prompt(self) -> bool:
        """[klein] base models run classifier-free guidance against the empty prompt."""
        return self.family == "qwen3"

    def negative_embeds(self, *, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """The empty prompt's embeddings (the negative of [klein] base's guidance), computed once."""
        key = dtype or self.dtype
        if key not in self._negative:
            self._negative[key] = self.encode("", dtype=dtype)
        return self._negative[key]

    @property
    def released(self) -> bool:
        return self.model is None

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise Flux2KitError(
                "This FLUX.2 text encoder was released to free memory and can no longer encode. "
                "Load the text encoder again (or encode before releasing it)."
            )
        return self.model

    def count_tokens(self, prompt: str) -> int:
        """Tokens of the full chat sequence (system message + markup + prompt), before truncation."""
        return self._token_counts([prompt])[0]

    def _token_counts(self, prompts: list[str]) -> list[int]:
        if self.family == "qwen3":
            return [len(row) for row in self.tokenizer(qwen3_chat_texts(self.tokenizer, prompts))["input_ids"]]
        ids = self.tokenizer.apply_chat_template(
            format_messages(prompts), add_generation_prompt=False, tokenize=True, return_dict=True
        )["input_ids"]
        return [len(row) for row in ids]

    def encode(self, prompts: str | list[str], *, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """Encode one prompt or a batch into (B, max_length, embed_dim) embeddings."""
        model = self._require_model()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise Flux2KitError("No prompt to encode: pass a prompt string or a non-empty list of prompts.")
        for p in prompts:
            if not isinstance(p, str):
                raise Flux2KitError(f"Prompts must be text; got {type(p).__name__}.")

        counts = self._token_counts(prompts)
        truncated = [n > self.max_length for n in counts]
        self._warn_truncated(prompts, counts)

        inputs = self._tokenize(prompts)
        hidden = self._hidden_states(model, inputs["input_ids"], inputs["attention_mask"])
        out = torch.stack(hidden, dim=1)  # (B, layers, L, H)
        b, n, length, h = out.shape
        embeds = out.permute(0, 2, 1, 3).reshape(b, length, n * h)
        return PromptEmbeds(
            embeds=embeds.to(dtype or self.dtype),
            prompts=prompts,
            token_counts=counts,
            truncated=truncated,
            family=self.family,
        )

    def _tokenize(self, prompts: list[str]):
        if self.family == "qwen3":
            return self.tokenizer(
                qwen3_chat_texts(self.tokenizer, prompts),
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
            )
        return self.tokenizer.apply_chat_template(
            format_messages(prompts),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
        )

    def _hidden_states(self, model, input_ids, attention_mask) -> list[torch.Tensor]:
        # hidden_states[k] of the full model is the output of decoder layer k-1 (0-based), before
        # any final norm; forward hooks read exactly that.
        captured: dict[int, torch.Tensor] = {}

        def hook_for(k):
            def hook(_module, _args, output):
                captured[k] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [model.layers[k - 1].register_forward_hook(hook_for(k)) for k in self.hidden_layers]
        try:
            with torch.no_grad():
                model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    use_cache=False,
                )
        finally:
            for handle in handles:
                handle.remove()
        return [captured[k] for k in self.hidden_layers]

    def _warn_truncated(self, prompts: list[str], counts: list[int]) -> None:
        cut_from = "start" if getattr(self.tokenizer, "truncation_side", "right") == "left" else "end"
        for i, n in enumerate(counts):
            if n > self.max_length:
                which = f"Prompt {i + 1} of {len(prompts)}" if len(prompts) > 1 else "The prompt"
                logger.warning(
                    "%s is %d tokens long with the chat markup; FLUX.2 reads at most %d, "
                    "so %d tokens at the %s were dropped. Shorten the prompt to keep all of it.",
                    which, n, self.max_length, n - self.max_length, cut_from,
                )  # fmt: skip

    def to(self, device) -> "Flux2TextEncoder":
        """Move the weights (e.g. off the GPU before sampling). A released encoder has nothing to move."""
        device = torch.device(device)
        if self.model is not None:
            self.model.to(device)
        self.device = device
        return self

    def release(self) -> None:
        """Drop the weights to free memory; ``encode`` then raises, ``count_tokens`` still works."""
        if self.model is None:
            return
        was_cuda = self.device.type == "cuda"
        self.model = None
        gc.collect()
        if was_cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Loading


def load_text_encoder(
    path: str, *, device="cpu", dtype: torch.dtype | str | None = None, weights: str = "as_stored",
    tokenizer: str | None = None,
) -> Flux2TextEncoder:
    """Load a FLUX.2 text encoder from a Hugging Face folder: Mistral-Small-3.x ([dev]) or Qwen3 ([klein]).

    ``path``: a diffusers FLUX.2 root (``text_encoder/`` + ``tokenizer/``), a ``text_encoder/``
    folder with a sibling ``tokenizer/``, or one folder with config, weights and tokenizer. The
    family comes from config.json (``model_type``); the result's ``.family`` says which.
    ``dtype`` defaults to fp32 on CPU (bf16 matmuls are slow there) and bf16 on GPU.
    """
    # Single-file text encoders (ComfyUI's text_encoders/*.safetensors) are dispatched here, before
    # the folder logic below: see text_encoder_files.py. ``weights``: as_stored | dequantize (FP8
    # files) | quantize (FP8 in memory); ``tokenizer``: a tokenizer folder for single files.
    from . import text_encoder_files

    if text_encoder_files.is_single_file(path):
        return text_encoder_files.load_text_encoder_file(path, device=device, dtype=dtype, tokenizer=tokenizer,
                                                         weights=weights)
    if weights == "quantize":
        return text_encoder_files.load_text_encoder_folder_quantized(path, device=device, dtype=dtype)
    if weights not in text_encoder_files.WEIGHT_MODES:
        raise Flux2KitError(f"Unknown weight mode {weights!r}; use one of {', '.join(text_encoder_files.WEIGHT_MODES)}.")
    device = torch.device(device)
    dtype = _resolve_dtype(dtype, device)
    model_dir, tokenizer_dirs = _resolve_folders(path)
    family, text_config = _read_text_config(model_dir)
    tokenizer_dir = _find_tokenizer_dir(tokenizer_dirs, family)
    files = safetensors_files_in(model_dir, "model")
    tokenizer = _load_tokenizer(tokenizer_dir, family)
    # A tokenizer smaller than the embedding table passes check_tokenizer_fits yet may be another model's
    # (Mistral's 131072 tokens next to Qwen3's 151936 rows): check the family's chat tokens too.
    text_encoder_files.check_tokenizer_belongs(tokenizer, family, int(text_config.vocab_size), model_dir, tokenizer_dir)
    num_layers = max(FAMILY_LAYERS[family])
    try:
        with TensorFile.open(files) as weights:
            model = _build_text_model(text_config, weights, num_layers=num_layers, device=device, dtype=dtype,
                                      family=family)
    except BaseException as exc:
        # The half-built model must not stay alive through the traceback ComfyUI keeps for its report.
        from .errors import forget_locals

        forget_locals(exc)
        gc.collect()
        raise
    return Flux2TextEncoder(model, tokenizer, family=family)


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
    if str(dtype).lower() not in names:
        raise Flux2KitError(f"Unknown dtype {dtype!r}; use one of bf16, fp16, fp32.")
    return names[str(dtype).lower()]


def _resolve_folders(path: str) -> tuple[str, list[str]]:
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


def _read_text_config(model_dir: str):
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


def _find_tokenizer_dir(candidates: list[str], family: str = "mistral") -> str:
    for folder in candidates:
        if os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, n)) for n in _TOKENIZER_FILES):
            return folder
    raise Flux2KitError(
        "No tokenizer found for the text encoder; looked in "
        + " and ".join(dict.fromkeys(candidates))
        + f". Copy the tokenizer/ folder of the {FAMILY_MODEL[family]} repository (tokenizer.json, "
        "tokenizer_config.json) next to text_encoder/."
    )


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids run past the embedding table belongs to another model: say so before encoding."""
    size = len(tokenizer)
    if size > int(vocab_size):
        raise Flux2KitError(
            f"The tokenizer has {size} tokens but the text encoder in {where} embeds only {vocab_size}: they belong to "
            "different models. Use the tokenizer that ships with this text encoder."
        )


def _load_tokenizer(folder: str, family: str = "mistral"):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # a broken or foreign tokenizer folder raises anything from OSError to KeyError
        raise Flux2KitError(f"Cannot load the tokenizer in {folder}: {e}") from None
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _processor_chat_template(folder)
    if not tokenizer.chat_template:
        raise Flux2KitError(
            f"The tokenizer in {folder} has no chat template (chat_template.jinja or a chat_template entry). "
            f"{FAMILY_MODEL[family]} encodes prompts as {'Mistral' if family == 'mistral' else 'Qwen3'} chat "
            f"messages; copy the tokenizer folder of the {FAMILY_MODEL[family]} repository."
        )
    if tokenizer.pad_token is None:
        raise Flux2KitError(f"The tokenizer in {folder} has no padding token; FLUX.2 pads prompts to 512 tokens.")
    return tokenizer


def _processor_chat_template(folder: str) -> str | None:
    # Processor-style folders keep the template in chat_template.json or processor_config.json.
    for name in ("chat_template.json", "processor_config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, str) and template:
            return template
    return None


def _build_text_model(text_config, weights: TensorFile, *, num_layers: int, device, dtype, family="mistral") -> nn.Module:
    """The language model truncated to ``num_layers``, built on meta and filled tensor by tensor."""
    if family == "qwen3":
        from transformers import Qwen3Model as TextModel
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as RotaryEmbedding
    else:
        from transformers import MistralModel as TextModel
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding as RotaryEmbedding

    config = copy.deepcopy(text_config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    with torch.device("meta"):
        model = TextModel(config)
    # The final norm belongs after the last layer of the full model, not after the last one we keep.
    model.norm = nn.Identity()
    model.rotary_emb = RotaryEmbedding(config=config).to(device)

    prefix = _text_prefix(weights, family)
    family_name = "Mistral" if family == "mistral" else "Qwen3"
    usual = "Mistral-Small-3.x" if family == "mistral" else "Qwen3 (the text_encoder/ of FLUX.2 [klein])"
    wanted = {name: p for name, p in model.named_parameters()}
    loaded: set[str] = set()
    for key in weights.keys():
        if not key.startswith(prefix):
            continue  # vision tower, projector, LM head
        name = key[len(prefix):]
        layer = _LAYER_KEY.match(name)
        if (layer and int(layer.group(1)) >= num_layers) or name.startswith("norm."):
            continue  # later layers and the final norm never reach the last hidden state read
        if not (layer or name.startswith("embed_tokens.")) or name.endswith("rotary_emb.inv_freq"):
            continue  # other heads under a bare prefix; RoPE tables some old checkpoints saved
        if name not in wanted:
            raise UnsupportedFormatError(
                f"{weights.name} has a tensor {key!r} that a plain {family_name} layer does not have (a quantized or "
                f"adapter checkpoint?). Use the bf16 Hugging Face weights of {usual}."
            )
        info = weights.info(key)
        if info.is_fp8:
            raise UnsupportedFormatError(
                f"{weights.name} stores {key} as {info.dtype}. This loader reads bf16/fp16/fp32 Hugging Face "
                "folders of the text encoder; use the bf16 weights."
            )
        if tuple(info.shape) != tuple(wanted[name].shape):
            raise Flux2KitError(
                f"{key} in {weights.name} has shape {list(info.shape)} but config.json implies "
                f"{list(wanted[name].shape)}: the weights and config.json belong to different models."
            )
        _set_parameter(model, name, weights.get(key).to(device=device, dtype=dtype))
        loaded.add(name)

    missing = [name for name in wanted if name not in loaded]
    if missing:
        raise Flux2KitError(
            f"The text encoder weights lack {len(missing)} tensors FLUX.2 needs, e.g. {prefix}{missing[0]}. "
            f"{FAMILY_MODEL[family]} reads the first {num_layers} layers; the download may be incomplete (missing "
            "shards?)."
        )
    return model.eval().requires_grad_(False)


def _text_prefix(weights: TensorFile, family: str = "mistral") -> str:
    for prefix in _TEXT_PREFIXES:
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


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
