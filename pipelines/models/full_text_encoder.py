"""The whole FLUX.2 [dev] text encoder, for prompt upsampling: every layer, the LM head and the vision tower.

FLUX.2 [dev] conditions on three hidden states of Mistral-Small-3.x, so ``load_text_encoder`` loads
only the embedding and the first 30 of its 40 layers. Prompt upsampling (diffusers'
``Flux2Pipeline.upsample_prompt``, BFL's ``Mistral3SmallEmbedder.upsample_prompt``) makes the same
model *write* text: that needs all 40 layers, the final norm, the LM head (hidden states -> words)
and, to look at reference images, the Pixtral vision tower and its projector. This module loads
them from the same files (Hugging Face folders, bf16 or FP8; single files where they hold the head;
llama.cpp GGUFs of the whole model, text only, their layers and head kept packed as ``GGUFLinear``)
and gives an encoder that encodes exactly like the trimmed one (its FLUX.2 view shares the very
same embedding and first 30 layers) and can generate.

Memory (Mistral-Small-3.x, bf16; docs/checkpoints.md): the trimmed encoder is 34.7 GB, the whole
model 48.0 GB, i.e. 13.3 GB more (10 layers 11.1 GB, LM head 1.3 GB, vision tower and projector
0.9 GB). Without the vision tower: 47.1 GB.
"""

from __future__ import annotations

import copy
import gc
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import Flux2KitError, forget_locals
from ..files.fp8 import read_fp8_layer
from ..files.gguf import packed_layers
from ..files.quantize import quantized_text_encoder_checkpoint
from ..files.text_encoder_checkpoint import (
    FAMILY_LAYERS,
    LAYER_KEY,
    TextEncoderCheckpoint,
    inspect_text_encoder,
)
from ..files.tokenizers import tokenizer_for
from ..prompting.pixtral_inputs import PixtralInputs
from .fp8_linear import WEIGHT_MODES, FP8Linear
from .gguf_linear import gguf_module_for
from .meta import assign, missing_tensors, set_module
from .text_encoder import Flux2TextEncoder, build_text_model, resolve_dtype

# What a text encoder loader loads: the layers FLUX.2 reads, or the whole model (with or without vision).
PARTS = ("flux2", "full", "full-text")
# Where the LM head and the vision parts live, by checkpoint generation (transformers 5 / before 4.52 / ComfyUI).
_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight",
              "model.language_model.lm_head.weight")
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
KLEIN_REFUSAL = (
    "Prompt upsampling runs on FLUX.2 [dev]'s Mistral-Small-3.x, not on FLUX.2 [klein]'s Qwen3: Black Forest Labs' "
    "reference does not upsample with Qwen3 (its Qwen3 encoder refuses, and their command line loads the [dev] Mistral "
    "for [klein]'s upsampling), and flux2kit cannot check here that Qwen3 rewrites prompts soundly. Load FLUX.2 [dev]'s "
    "text encoder (a Hugging Face folder) with parts = 'full model, for prompt upsampling' for the Prompt Upsample "
    "node, and feed its text to [klein]'s Text Encode."
)


@dataclass
class FullModelParts:
    """What a checkpoint holds beyond the layers FLUX.2 reads (no weights loaded)."""

    layers: int  # decoder layers in the weights
    config_layers: int  # decoder layers the config describes
    has_norm: bool  # the final norm (a file pruned to FLUX.2's layers ends before it)
    head_key: str | None  # the LM head's tensor
    vision_prefix: str | None  # the vision tower's and the projector's tensors, with the config to build them
    projector_prefix: str | None
    vision_config: object | None  # Mistral3Config of a Hugging Face folder whose weights include the vision tower

    @property
    def has_vision(self) -> bool:
        return self.vision_config is not None


def inspect_full_model(ckpt: TextEncoderCheckpoint) -> FullModelParts:
    """Which parts of the whole model a checkpoint holds; a clear error when it cannot generate text at all."""
    name = ckpt.encoder_name
    if ckpt.family != "mistral":
        raise Flux2KitError(f"{name} is FLUX.2 [klein]'s Qwen3 text encoder. {KLEIN_REFUSAL}")
    files, prefix = ckpt.files, ckpt.prefix
    present = {int(m.group(1)) for k in files.keys() if k.startswith(prefix) and (m := LAYER_KEY.match(k[len(prefix):]))}
    layers = 1 + max(present) if present else 0
    config_layers = int(ckpt.config.num_hidden_layers)
    has_norm = f"{prefix}norm.weight" in files
    head_key = next((k for k in _HEAD_KEYS if k in files), None)
    fix = ("Load the Hugging Face folder of FLUX.2 [dev] (text_encoder/ + tokenizer/, 48 GB in bf16) or of "
           "Mistral-Small-3.2-24B-Instruct-2506, which hold the whole model.")
    if not has_norm or layers < config_layers or len(present) < layers:
        missing = sorted(set(range(config_layers)) - present)
        gap = f" (layers {missing[0]}-{missing[-1]} are missing)" if missing else ""
        raise Flux2KitError(
            f"{name} holds {len(present)} layers of the language model{'' if has_norm else ' and no final norm'}{gap}: "
            f"it was pruned to the {max(FAMILY_LAYERS['mistral'])} layers FLUX.2 reads (like ComfyUI's pruned "
            "mistral_3_small_flux2 files), or the download is incomplete. Prompt upsampling writes text with the whole "
            f"model: all layers, the final norm and the LM head. {fix}"
        )
    if head_key is None:
        raise Flux2KitError(
            f"{name} holds the whole language model but not its LM head (lm_head.weight, which turns hidden states into "
            "words): ComfyUI's single files leave it out, since ComfyUI only encodes prompts. Prompt upsampling needs "
            f"it. {fix}"
        )
    vision_prefix = next((p for p in _VISION_PREFIXES if f"{p}patch_conv.weight" in files), None)
    projector_prefix = next((p for p in _PROJECTOR_PREFIXES if f"{p}linear_1.weight" in files), None)
    vision_config = None
    if vision_prefix and projector_prefix and not ckpt.single_file:
        vision_config = _mistral3_config(ckpt.model_dir)
    return FullModelParts(layers, config_layers, has_norm, head_key, vision_prefix, projector_prefix, vision_config)


def _mistral3_config(model_dir: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return config if getattr(config, "model_type", "") == "mistral3" else None


class FullTextEncoder(Flux2TextEncoder):
    """A FLUX.2 [dev] text encoder that can also write: ``encode`` as the trimmed one, plus the whole model.

    ``generator`` is ``Mistral3ForConditionalGeneration`` (with the vision tower) or ``MistralForCausalLM``
    (text only); ``pixtral`` says how it reads images (None: it cannot).
    """

    can_upsample = True

    def __init__(self, generator: nn.Module, language_model: nn.Module, tokenizer, *,
                 pixtral: PixtralInputs | None = None, notes: tuple[str, ...] = ()):
        super().__init__(flux2_view(language_model), tokenizer, family="mistral")
        self.generator = generator
        self.pixtral = pixtral
        self.notes = list(notes)

    @property
    def has_vision(self) -> bool:
        return self.pixtral is not None

    @property
    def parts(self) -> str:
        return "full" if self.has_vision else "full-text"

    def memory(self) -> tuple[int, int]:
        """``(bytes of the whole model, bytes of the part FLUX.2's conditioning reads)``."""
        return module_bytes(self.generator), module_bytes(self.model)

    def to(self, device) -> "FullTextEncoder":
        device = torch.device(device)
        if self.generator is not None:
            self.generator.to(device)  # moves the FLUX.2 view too: it shares the modules
        self.device = device
        return self

    def release(self) -> None:
        self.generator = None
        super().release()


def module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def flux2_view(language_model: nn.Module) -> nn.Module:
    """The trimmed encoder FLUX.2 reads, sharing the embedding and first layers of ``language_model`` (no copy).

    Encoding through it runs exactly the code and the weights of ``load_text_encoder``'s model, and stops
    after the last layer read instead of running all 40.
    """
    from transformers import MistralModel

    kept = max(FAMILY_LAYERS["mistral"])
    config = copy.deepcopy(language_model.config)
    config.num_hidden_layers = kept
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:kept]
    with torch.device("meta"):
        view = MistralModel(config)
    view.embed_tokens = language_model.embed_tokens
    view.layers = nn.ModuleList(list(language_model.layers)[:kept])
    view.norm = nn.Identity()
    view.rotary_emb = language_model.rotary_emb
    return view.eval()


# ---------------------------------------------------------------------------------------------
# Loading


def load_full_text_encoder(
    path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | str | None = None, weights: str = "as_stored",
    tokenizer: str | os.PathLike | None = None, vision: bool = True,
) -> FullTextEncoder:
    """Load FLUX.2 [dev]'s whole Mistral-Small-3.x for prompt upsampling (and encoding, as ``load_text_encoder``).

    ``vision=False`` leaves the vision tower out (text-to-image upsampling only, 0.9 GB less); a checkpoint
    without one loads text-only, with a note in ``.notes``. ``weights`` as ``load_text_encoder`` (``quantize``
    turns the decoder linears into FP8; the LM head and the vision tower stay in ``dtype``).
    """
    if weights not in WEIGHT_MODES:
        raise Flux2KitError(f"Unknown weight mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}.")
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    ckpt = inspect_text_encoder(path, tokenizer_given=tokenizer is not None)
    source = ckpt.files  # the LM head and vision tower are read from here (a quantized view holds only the layers)
    generator = language = None
    try:
        parts = inspect_full_model(ckpt)
        notes = []
        if vision and not parts.has_vision:
            notes.append(_no_vision_note(ckpt, parts))
        with_vision = vision and parts.has_vision
        tok = tokenizer_for(ckpt, tokenizer)
        if weights == "quantize":
            ckpt, weights = quantized_text_encoder_checkpoint(ckpt), "as_stored"
        language = build_text_model(ckpt, device=device, dtype=dtype, weights=weights, whole=True)
        generator = _build_generator(ckpt, parts, language, source, with_vision, device=device, dtype=dtype,
                                     weights=weights)
        _set_generation_config(generator, ckpt, tok)
        pixtral = PixtralInputs.for_model(parts.vision_config, ckpt.tokenizer_dir) if with_vision else None
        return FullTextEncoder(generator, language, tok, pixtral=pixtral, notes=tuple(notes))
    except BaseException as exc:
        del generator, language  # nothing half-built stays alive through the traceback
        forget_locals(exc)
        gc.collect()
        raise
    finally:
        ckpt.files.close()
        source.close()


def _no_vision_note(ckpt: TextEncoderCheckpoint, parts: FullModelParts) -> str:
    why = ("a single file carries no vision configuration" if ckpt.single_file and parts.vision_prefix
           else "it has no vision tower")
    return (f"{ckpt.encoder_name}: text-only prompt upsampling ({why}); reference images cannot be read. For "
            "image-to-image upsampling load the Hugging Face folder of FLUX.2 [dev] (text_encoder/ + tokenizer/).")


def _build_generator(ckpt, parts: FullModelParts, language: nn.Module, files, with_vision: bool, *, device, dtype,
                     weights: str) -> nn.Module:
    """The generating model on meta around the loaded language model; the LM head and vision parts streamed in."""
    from transformers import Mistral3ForConditionalGeneration, MistralForCausalLM

    with torch.device("meta"):
        if with_vision:
            generator = Mistral3ForConditionalGeneration(parts.vision_config)
        else:
            generator = MistralForCausalLM(ckpt.config)
    set_module(generator, "model.language_model" if with_vision else "model", language)
    _load_head(generator, files, parts.head_key, device=device, dtype=dtype, weights=weights)
    if with_vision:
        from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

        tower = generator.model.vision_tower
        tower.patch_positional_embedding = PixtralVisionRotaryEmbedding(tower.config).to(device)  # a computed buffer
        _stream(generator.model.vision_tower, files, parts.vision_prefix, device=device, dtype=dtype)
        _stream(generator.model.multi_modal_projector, files, parts.projector_prefix, device=device, dtype=dtype)
    missing = missing_tensors(generator)
    if missing:
        raise Flux2KitError(
            f"{ckpt.encoder_name} is incomplete: the whole model lacks {len(missing)} tensors, e.g. {missing[0]}. The "
            "download may not have finished (missing shards?): download it again."
        )
    return generator.eval().requires_grad_(False)


def _load_head(generator, files, key: str, *, device, dtype, weights: str) -> None:
    layer = key[: -len(".weight")]
    q = _quantization_of(files, layer)
    expected = tuple(generator.lm_head.weight.shape)
    if tuple(files.info(key).shape) != expected:
        raise Flux2KitError(f"{key} in {files.name} has shape {list(files.info(key).shape)}, not {list(expected)}: the "
                            "LM head belongs to another model (or the file is damaged).")
    ggml_type = packed_layers(files).get(layer)
    if ggml_type is not None and weights == "as_stored":  # a GGUF's quantized head stays packed, like its layers
        set_module(generator, "lm_head", gguf_module_for(generator.lm_head, ggml_type, compute_dtype=dtype))
        assign(generator, "lm_head.weight", files.packed(key).to(device))
        return
    if q is None:
        assign(generator, "lm_head.weight", files.get(key).to(device=device, dtype=dtype))
        return
    w, scale = read_fp8_layer(files, layer, q)
    if weights == "dequantize":
        assign(generator, "lm_head.weight", (w.float() * (scale[:, None] if q.per_row else scale)).to(device, dtype))
        return
    head = generator.lm_head
    set_module(generator, "lm_head", FP8Linear(head.in_features, head.out_features, bias=False, weight_dtype=q.dtype,
                                               per_row=q.per_row, has_input_scale=False, compute_dtype=dtype,
                                               device="meta"))
    assign(generator, "lm_head.weight", w.to(device))
    assign(generator, "lm_head.weight_scale", scale.to(device))


def _quantization_of(files, layer: str):
    from ..files.fp8 import scan_quantization

    if not files.info(layer + ".weight").is_fp8 and (layer + ".weight_scale") not in files and \
            (layer + ".scale_weight") not in files:
        return None
    return scan_quantization(files, "")[1].get(layer)


def _stream(module: nn.Module, files, prefix: str, *, device, dtype) -> None:
    """Every tensor under ``prefix`` into ``module`` (the vision tower and projector are stored in bf16)."""
    for key in [k for k in files.keys() if k.startswith(prefix)]:
        name = key[len(prefix):]
        if name.endswith("inv_freq"):
            continue
        try:
            expected = module.get_parameter(name)
        except AttributeError:
            raise Flux2KitError(f"{files.name} has {key}, which the vision tower of its config does not have: the "
                                "weights and config.json belong to different models.") from None
        if tuple(files.info(key).shape) != tuple(expected.shape):
            raise Flux2KitError(f"{key} in {files.name} has shape {list(files.info(key).shape)} but config.json implies "
                                f"{list(expected.shape)}: the weights and the config belong to different models.")
        assign(module, name, files.get(key).to(device=device, dtype=dtype))


def _set_generation_config(generator, ckpt: TextEncoderCheckpoint, tokenizer) -> None:
    """The folder's generation_config.json, as ``from_pretrained`` reads it; else the model config's tokens,
    with the tokenizer's where the config has none (a single file's config comes from tensor shapes)."""
    from transformers import GenerationConfig

    folder = ckpt.model_dir
    if folder and os.path.isfile(os.path.join(folder, "generation_config.json")):
        generator.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    config = generator.generation_config
    for field, token in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                         ("pad_token_id", tokenizer.pad_token_id)):
        if getattr(config, field, None) is None or ckpt.single_file:
            setattr(config, field, token)
