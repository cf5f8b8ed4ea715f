"""FLUX.2 [dev] prompt encoding with Mistral-Small-3.x, loaded lean.

FLUX.2 [dev] conditions on the hidden states after decoder layers 10, 20 and 30 of the 40-layer
Mistral-Small-3.x language model, stacked per token into (B, 512, 3 * hidden). Layers 31-40, the
final norm, the LM head, the vision tower and the projector never influence those numbers, so
this loader builds only the embedding and the first 30 layers, on the meta device, and streams
their tensors one at a time from safetensors: the skipped parts are never read.

The encoding reproduces diffusers' ``Flux2Pipeline._get_mistral_3_small_prompt_embeds``: the same
chat messages (BFL's system message, list-of-parts content), the tokenizer's own chat template,
padding to 512, truncation, and the attention mask.
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
HIDDEN_LAYERS = (10, 20, 30)
MAX_LENGTH = 512

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


class Flux2TextEncoder:
    """Mistral-Small-3.x trimmed to the layers FLUX.2 reads; ``encode`` turns prompts into embeddings."""

    def __init__(self, model: nn.Module, tokenizer, *, hidden_layers=HIDDEN_LAYERS, max_length=MAX_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_layers = tuple(hidden_layers)
        self.max_length = max_length
        self.embed_dim = len(self.hidden_layers) * model.config.hidden_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

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

        inputs = self.tokenizer.apply_chat_template(
            format_messages(prompts),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
        )
        hidden = self._hidden_states(model, inputs["input_ids"], inputs["attention_mask"])
        out = torch.stack(hidden, dim=1)  # (B, layers, L, H)
        b, n, length, h = out.shape
        embeds = out.permute(0, 2, 1, 3).reshape(b, length, n * h)
        return PromptEmbeds(
            embeds=embeds.to(dtype or self.dtype),
            prompts=prompts,
            token_counts=counts,
            truncated=truncated,
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
                    "%s is %d tokens long with the system message and chat markup; FLUX.2 reads at most %d, "
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


def load_text_encoder(path: str, *, device="cpu", dtype: torch.dtype | str | None = None) -> Flux2TextEncoder:
    """Load FLUX.2 [dev]'s Mistral-Small-3.x encoder from a Hugging Face folder.

    ``path``: a diffusers FLUX.2 root (``text_encoder/`` + ``tokenizer/``), a ``text_encoder/``
    folder with a sibling ``tokenizer/``, or one folder with config, weights and tokenizer.
    ``dtype`` defaults to fp32 on CPU (bf16 matmuls are slow there) and bf16 on GPU.
    """
    device = torch.device(device)
    dtype = _resolve_dtype(dtype, device)
    model_dir, tokenizer_dirs = _resolve_folders(path)
    text_config = _read_text_config(model_dir, needed_layers=max(HIDDEN_LAYERS))
    tokenizer_dir = _find_tokenizer_dir(tokenizer_dirs)
    files = safetensors_files_in(model_dir, "model")
    tokenizer = _load_tokenizer(tokenizer_dir)
    with TensorFile.open(files) as weights:
        model = _build_text_model(text_config, weights, num_layers=max(HIDDEN_LAYERS), device=device, dtype=dtype)
    return Flux2TextEncoder(model, tokenizer)


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
            f"{os.path.basename(path)} is a single file. This loader reads a Hugging Face folder: the FLUX.2 "
            "[dev] repository (text_encoder/ + tokenizer/) or a folder with config.json, .safetensors weights "
            "and tokenizer files."
        )
    path = os.path.abspath(path)
    nested = os.path.join(path, "text_encoder")
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(nested, "config.json")):
        return nested, [os.path.join(path, "tokenizer"), nested]
    if os.path.exists(os.path.join(path, "config.json")):
        return path, [path, os.path.join(os.path.dirname(path), "tokenizer")]
    raise Flux2KitError(
        f"No config.json in {path} (nor in {nested}). Point to the FLUX.2 [dev] model folder (with text_encoder/ "
        "and tokenizer/) or to a Mistral-Small-3.x folder with config.json, .safetensors weights and tokenizer."
    )


def _read_text_config(model_dir: str, needed_layers: int):
    """The language model's transformers config, after checking this is a usable Mistral encoder."""
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
    _refuse_other_encoders(model_type, architectures, model_dir)

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a config it cannot parse
        raise Flux2KitError(f"transformers cannot read {config_path} ({e}).") from None
    text_config = config.text_config if model_type == "mistral3" else config
    if getattr(text_config, "model_type", "") != "mistral":
        raise Flux2KitError(
            f"{model_dir} is a Mistral3 model whose language model is {text_config.model_type!r}, not Mistral. "
            "FLUX.2 [dev] needs Mistral-Small-3.x (Mistral3ForConditionalGeneration)."
        )
    layers = int(text_config.num_hidden_layers)
    if layers < needed_layers:
        raise Flux2KitError(
            f"The text encoder in {model_dir} has {layers} layers; FLUX.2 [dev] reads the hidden states after "
            f"layers {', '.join(map(str, HIDDEN_LAYERS))}, so it needs at least {needed_layers}. "
            "Use Mistral-Small-3.x (40 layers) or a pruned copy that keeps the first 30."
        )
    return text_config


def _refuse_other_encoders(model_type: str, architectures: str, model_dir: str) -> None:
    if model_type in ("mistral3", "mistral"):
        return
    if model_type.startswith("qwen"):
        raise Flux2KitError(
            f"{model_dir} holds a Qwen text encoder ({architectures}), the one FLUX.2 [klein] uses. "
            "flux2kit supports FLUX.2 [dev] with Mistral-Small-3.x for now; [klein] support comes in a later version."
        )
    if model_type in ("t5", "umt5", "mt5", "t5encoder", "clip", "clip_text_model", "llama", "gemma", "gemma2"):
        raise Flux2KitError(
            f"{model_dir} holds a {architectures} text encoder, not FLUX.2's. FLUX.2 [dev] needs Mistral-Small-3.x "
            "(Mistral3ForConditionalGeneration); T5 and CLIP belong to FLUX.1."
        )
    raise Flux2KitError(
        f"{model_dir} holds a {architectures} model. FLUX.2 [dev] needs Mistral-Small-3.x "
        "(Mistral3ForConditionalGeneration, text_encoder/ in the FLUX.2-dev repository)."
    )


def _find_tokenizer_dir(candidates: list[str]) -> str:
    for folder in candidates:
        if os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, n)) for n in _TOKENIZER_FILES):
            return folder
    raise Flux2KitError(
        "No tokenizer found for the text encoder; looked in "
        + " and ".join(dict.fromkeys(candidates))
        + ". Copy the tokenizer/ folder of the FLUX.2 [dev] repository (tokenizer.json, tokenizer_config.json) "
        "next to text_encoder/."
    )


def _load_tokenizer(folder: str):
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
            "FLUX.2 [dev] encodes prompts as Mistral chat messages; copy the tokenizer folder of the FLUX.2 [dev] "
            "repository."
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


def _build_text_model(text_config, weights: TensorFile, *, num_layers: int, device, dtype) -> nn.Module:
    """The language model truncated to ``num_layers``, built on meta and filled tensor by tensor."""
    from transformers import MistralModel
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    config = copy.deepcopy(text_config)
    config.num_hidden_layers = num_layers
    with torch.device("meta"):
        model = MistralModel(config)
    # The final norm belongs after layer 40, not after the last layer we keep.
    model.norm = nn.Identity()
    model.rotary_emb = MistralRotaryEmbedding(config=config).to(device)

    prefix = _text_prefix(weights)
    wanted = {name: p for name, p in model.named_parameters()}
    loaded: set[str] = set()
    for key in weights.keys():
        if not key.startswith(prefix):
            continue  # vision tower, projector, LM head
        name = key[len(prefix):]
        layer = _LAYER_KEY.match(name)
        if (layer and int(layer.group(1)) >= num_layers) or name.startswith("norm."):
            continue  # layers 31+ and the final norm never reach hidden state 30
        if not (layer or name.startswith("embed_tokens.")) or name.endswith("rotary_emb.inv_freq"):
            continue  # other heads under a bare prefix; RoPE tables some old checkpoints saved
        if name not in wanted:
            raise UnsupportedFormatError(
                f"{weights.name} has a tensor {key!r} that a plain Mistral layer does not have (a quantized or "
                "adapter checkpoint?). Use the bf16 Hugging Face weights of Mistral-Small-3.x."
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
            f"FLUX.2 [dev] reads the first {num_layers} layers; the download may be incomplete (missing shards?)."
        )
    return model.eval().requires_grad_(False)


def _text_prefix(weights: TensorFile) -> str:
    for prefix in _TEXT_PREFIXES:
        if f"{prefix}embed_tokens.weight" in weights:
            return prefix
    sample = ", ".join(sorted(weights.keys())[:3])
    raise Flux2KitError(
        f"{weights.name} does not hold a Mistral language model (no embed_tokens.weight; first keys: {sample}). "
        "FLUX.2 [dev] needs the Mistral-Small-3.x text encoder weights."
    )


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
