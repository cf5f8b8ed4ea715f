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
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..devices import default_dtype
from ..errors import Flux2KitError, UnsupportedFormatError, forget_locals
from ..files.fp8 import read_fp8_layer
from ..files.gguf import packed_layers
from ..files.quantize import quantized_text_encoder_checkpoint
from ..files.text_encoder_checkpoint import (
    FAMILY_LAYERS,
    FAMILY_MODEL,
    LAYER_KEY,
    TEKKEN_KEY,
    TextEncoderCheckpoint,
    inspect_text_encoder,
)
from ..files.tokenizers import tokenizer_for
from ..parameters import MAX_TEXT_TOKENS
from .fp8_linear import WEIGHT_MODES, FP8Linear
from .gguf_linear import gguf_module_for
from .meta import assign, missing_tensors, set_module

logger = logging.getLogger("flux2kit")

# Black Forest Labs' system message for [dev] (flux2 repo, system_messages.py); the line break
# after "object" is part of the original and changes the tokens.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)
MAX_LENGTH = MAX_TEXT_TOKENS


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
    path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | str | None = None, weights: str = "as_stored",
    tokenizer: str | os.PathLike | None = None,
) -> Flux2TextEncoder:
    """Load a FLUX.2 text encoder: Mistral-Small-3.x ([dev]) or Qwen3 ([klein]), bf16 or FP8.

    ``path``: a Hugging Face folder (a diffusers FLUX.2 root with ``text_encoder/`` + ``tokenizer/``, a
    ``text_encoder/`` folder with a sibling ``tokenizer/``, or one folder with config, weights and
    tokenizer) or a ComfyUI single file (``text_encoders/*.safetensors``). ``tokenizer``: a tokenizer
    folder; Mistral single files carry theirs (``tekken_model``), Qwen3 single files need one (inside
    ComfyUI the loader node passes ComfyUI's own). ``weights``: ``as_stored`` keeps FP8 layers FP8,
    ``dequantize`` expands them to ``dtype``, ``quantize`` turns the decoder linears into FP8 while
    loading (exactly as ``save_text_encoder_file(quantize=True)``). ``dtype`` defaults to fp32 on CPU
    (bf16 matmuls are slow there) and bf16 on GPU. The result's ``.family`` says which encoder it is.
    """
    if weights not in WEIGHT_MODES:
        raise Flux2KitError(f"Unknown weight mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}.")
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    ckpt = inspect_text_encoder(path, tokenizer_given=tokenizer is not None)
    model = None
    try:
        tok = tokenizer_for(ckpt, tokenizer)
        if weights == "quantize":
            ckpt, weights = quantized_text_encoder_checkpoint(ckpt), "as_stored"
        model = build_text_model(ckpt, device=device, dtype=dtype, weights=weights)
        return Flux2TextEncoder(model, tok, family=ckpt.family)
    except BaseException as exc:
        # The half-built model must not stay alive through the traceback ComfyUI keeps for its report.
        del model
        forget_locals(exc)
        gc.collect()
        raise
    finally:
        ckpt.files.close()


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
    if str(dtype).lower() not in names:
        raise Flux2KitError(f"Unknown dtype {dtype!r}; use one of bf16, fp16, fp32.")
    return names[str(dtype).lower()]


def build_text_model(ckpt: TextEncoderCheckpoint, *, device, dtype, weights: str = "as_stored",
                     whole: bool = False) -> nn.Module:
    """The language model trimmed to the layers FLUX.2 reads, built on meta and streamed from ``ckpt.files``.

    FP8 layers become FP8Linear and packed GGUF weights GGUFLinear / GGUFEmbedding (``weights="as_stored"``),
    or are dequantized to ``dtype``. ``whole``: every layer of the checkpoint and the final norm (the language
    model prompt upsampling generates with).
    """
    if ckpt.family == "qwen3":
        from transformers import Qwen3Model as TextModel
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as RotaryEmbedding
    else:
        from transformers import MistralModel as TextModel
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding as RotaryEmbedding

    num_layers = int(ckpt.config.num_hidden_layers) if whole else max(FAMILY_LAYERS[ckpt.family])
    config = copy.deepcopy(ckpt.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    with torch.device("meta"):
        model = TextModel(config)
    if not whole:  # the final norm belongs after the last layer of the full model, not after the last one we keep
        model.norm = nn.Identity()
    model.rotary_emb = RotaryEmbedding(config=config).to(device)
    fp8_layers = {layer: q for layer, q in ckpt.layers.items() if _kept(layer, num_layers)}
    if weights == "as_stored":
        for layer, q in fp8_layers.items():
            linear = model.get_submodule(layer)
            set_module(model, layer, FP8Linear(
                linear.in_features, linear.out_features, bias=linear.bias is not None, weight_dtype=q.dtype,
                per_row=q.per_row, has_input_scale=q.has_input_scale, compute_dtype=dtype, device="meta"))
    gguf_layers = _swap_in_gguf_layers(model, ckpt, num_layers, dtype) if weights == "as_stored" else {}

    files, prefix, name = ckpt.files, ckpt.prefix, ckpt.files.name
    unknown = []
    for key in files.keys():
        if not key.startswith(prefix) or key == TEKKEN_KEY:
            continue  # vision tower, projector, LM head (outside the language model's prefix)
        layer, _, param = key[len(prefix):].rpartition(".")
        if not _kept(layer, num_layers) and not (whole and layer == "norm"):
            continue  # later layers and the final norm never reach the last hidden state read; heads, RoPE tables
        if param in ("comfy_quant", "scale_input") or key.endswith(("scaled_fp8", "rotary_emb.inv_freq")):
            continue
        q = fp8_layers.get(layer)
        if q is not None and param in ("weight_scale", "scale_weight", "input_scale"):
            continue  # read with the weight
        if q is not None and param == "weight":
            w, scale = read_fp8_layer(files, prefix + layer, q)
            if weights == "dequantize":
                assign(model, f"{layer}.weight", (w.float() * (scale[:, None] if q.per_row else scale)).to(device, dtype))
            else:
                assign(model, f"{layer}.weight", w.to(device))
                assign(model, f"{layer}.weight_scale", scale.to(device))
                if q.has_input_scale:
                    assign(model, f"{layer}.input_scale", files.get(f"{prefix}{layer}.input_scale").float().reshape(()).to(device))
            continue
        if layer in gguf_layers and param == "weight":
            _assign_packed(model, layer, files, key, device)
            continue
        try:
            expected = model.get_submodule(layer)._parameters[param]
        except (AttributeError, KeyError):
            unknown.append(key)
            continue
        info = files.info(key)
        if tuple(info.shape) != tuple(expected.shape):
            raise Flux2KitError(
                f"{key} in {name} has shape {list(info.shape)} but the model's config implies {list(expected.shape)}: "
                "the weights and the config belong to different models (or the file is damaged)."
            )
        assign(model, f"{layer}.{param}", files.get(key).to(device=device, dtype=dtype))
    if unknown:
        family = "Mistral" if ckpt.family == "mistral" else "Qwen3"
        raise UnsupportedFormatError(
            f"{name} has tensors a plain {family} layer does not have (e.g. {unknown[0]}): an adapter or an "
            "unsupported quantization. Use the bf16 or FP8 weights of the text encoder (ComfyUI's single file, or the "
            "text_encoder/ folder of the FLUX.2 repository)."
        )
    missing = missing_tensors(model)
    if missing:
        raise Flux2KitError(
            f"{name} is incomplete: the weights lack {len(missing)} tensors FLUX.2 needs, e.g. {prefix}{missing[0]}. "
            f"{FAMILY_MODEL[ckpt.family]} reads the first {num_layers} layers; the download may not have finished "
            "(missing shards?): download it again."
        )
    return model.eval().requires_grad_(False)


def _swap_in_gguf_layers(model, ckpt: TextEncoderCheckpoint, num_layers: int, dtype) -> dict:
    """Packed GGUF weights of the kept layers become GGUFLinear / GGUFEmbedding modules; returns them by layer."""
    swapped = {}
    for layer, ggml_type in packed_layers(ckpt.files, ckpt.prefix).items():
        if not _kept(layer, num_layers):
            continue
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            continue  # no such layer: the tensor loop below reports it
        twin = gguf_module_for(module, ggml_type, compute_dtype=dtype)
        if twin is not None:
            set_module(model, layer, twin)
            swapped[layer] = twin
    return swapped


def _assign_packed(model, layer: str, files, key: str, device) -> None:
    module = model.get_submodule(layer)
    rows = getattr(module, "out_features", getattr(module, "num_embeddings", None))
    cols = getattr(module, "in_features", getattr(module, "embedding_dim", None))
    shape = tuple(files.info(key).shape)
    if shape != (rows, cols):
        raise Flux2KitError(
            f"{key} in {files.name} has shape {list(shape)} but the model's config implies {[rows, cols]}: the "
            "weights and the config belong to different models (or the file is damaged)."
        )
    assign(model, f"{layer}.weight", files.packed(key).to(device))


def _kept(layer: str, num_layers: int) -> bool:
    """Whether a module path (without prefix) is part of the trimmed model FLUX.2 reads."""
    m = LAYER_KEY.match(layer + ".")
    if m:
        return int(m.group(1)) < num_layers
    return layer == "embed_tokens"
