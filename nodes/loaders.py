"""Loader nodes: one per component, like ComfyUI's own, over ``pipelines`` loaders."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..pipelines.devices import default_dtype
from ..pipelines.errors import Flux2KitError
from ..pipelines.files.gguf import GGUFFile, is_gguf
from ..pipelines.files.memory_estimate import describe_before_loading
from ..pipelines.files.safetensors import read_header
from ..pipelines.models.fp8_linear import WEIGHT_MODES
from ..pipelines.models.full_text_encoder import load_full_text_encoder
from ..pipelines.models.text_encoder import load_text_encoder
from ..pipelines.models.transformer import load_transformer
from ..pipelines.models.vae import load_vae
from ..pipelines.parameters import KLEIN_MODES
from . import services
from .types import CATEGORY, VAE, TextEncoder, Transformer

# The loader's labels for the engine's weight modes (labels are saved in workflows: keep them).
WEIGHT_MODE_LABELS = dict(zip(("fp8 as stored", "bf16", "fp8 quantize on load"), WEIGHT_MODES))
# The text encoder loader's labels for what it loads (full_text_encoder.PARTS).
PARTS_LABELS = {"FLUX.2 layers (encode only)": "flux2", "full model, for prompt upsampling": "full",
                "full model, text only (no vision tower)": "full-text"}


def _announce(node_id, path: str, kind: str, dtype, weight_mode) -> str | None:
    """For a GGUF file loaded as stored: its quantization mix and the memory it will take, on the node before
    loading (a header read); returned so the node can show it again when done."""
    if not (os.path.isfile(path) and is_gguf(path)) or WEIGHT_MODE_LABELS.get(weight_mode or "", "as_stored") != "as_stored":
        return None
    try:
        text = describe_before_loading(path, kind, dtype)
    except Exception:  # the load itself reports a bad file, with the full message
        return None
    services.show_text(node_id, "loading " + os.path.basename(path) + "\n" + text)
    return text


def _bytes(module: torch.nn.Module, skip=()) -> int:
    skip_ids = {id(t) for m in skip for t in list(m.parameters()) + list(m.buffers())}
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if id(t) not in skip_ids)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class TransformerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitTransformerLoader",
            display_name="FLUX.2 Load Transformer (flux2kit)",
            category=CATEGORY,
            description="Loads a FLUX.2 transformer ([dev], [klein] 4B or 9B) from a BFL or ComfyUI single file (bf16 "
                        "or FP8), a GGUF file (Q8_0 ... Q2_K, kept quantized in memory) or a diffusers folder. The "
                        "layout and the model are detected from the file itself; for GGUF files the node shows the "
                        "quantization mix and the memory the model takes before it loads.",
            inputs=[
                io.Combo.Input("model_name", options=services.list_models(services.TRANSFORMER_FOLDERS, component="transformer"),
                               tooltip="A file in models/diffusion_models or models/unet (e.g. flux2_dev_fp8mixed.safetensors, "
                                       "or a GGUF such as flux2-dev-Q4_K_M.gguf) or a diffusers folder (ending in /) in "
                                       "models/diffusion_models or models/diffusers."),
                io.Combo.Input("weight_mode", options=list(WEIGHT_MODE_LABELS), default="fp8 as stored",
                               tooltip="fp8 as stored: FP8 layers stay FP8 in memory (FP8 matmuls on RTX 40xx and newer, "
                                       "per-layer dequantization elsewhere), GGUF weights stay quantized (each layer is "
                                       "dequantized just for its own matmul). bf16: expand FP8 or GGUF layers at load "
                                       "(several times the memory). "
                                       "fp8 quantize on load: a bf16 file's block linears become FP8 while loading (half "
                                       "the memory; the same numbers as a file saved by FLUX.2 Save FP8)."),
                io.Boolean.Input("offload_blocks", default=False,
                                 tooltip="Keep the transformer blocks in system RAM and move each to the GPU only while it "
                                         "runs: FLUX.2 [dev] on a 24 GB card, at some speed cost."),
                io.Combo.Input("klein_mode", options=list(KLEIN_MODES), default="auto", optional=True,
                               tooltip="FLUX.2 [klein] only ([dev] ignores it). distilled: 4 steps, no guidance (the "
                                       "guidance input is ignored). base: about 50 steps, classifier-free guidance "
                                       "against an empty prompt, scale = guidance. Both have identical tensors, so auto "
                                       "uses what the file or folder says (model_index.json) and otherwise asks you to "
                                       "pick; files named ...klein-base... are base. kv: FLUX.2 [klein] 9B KV "
                                       "(distilled; its references attend only to themselves, so their K/V are "
                                       "cached: see the Sampler's reference_cache); auto finds it in its diffusers "
                                       "folder."),
            ],
            outputs=[Transformer.Output(display_name="transformer", tooltip="The loaded FLUX.2 transformer.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name, weight_mode, offload_blocks, klein_mode="auto"):
        return services.file_fingerprint(services.TRANSFORMER_FOLDERS, model_name)

    @classmethod
    def execute(cls, model_name, weight_mode, offload_blocks, klein_mode="auto") -> io.NodeOutput:
        path = services.resolve_model(services.TRANSFORMER_FOLDERS, model_name)
        device = services.compute_device()
        node_id = cls.hidden.unique_id if cls.hidden else None
        status = _announce(node_id, path, "transformer", default_dtype(device), weight_mode)
        t = load_transformer(path, device=services.offload_device(), dtype=default_dtype(device),
                             weights=WEIGHT_MODE_LABELS.get(weight_mode, "as_stored"), offload_blocks=offload_blocks,
                             klein_mode=klein_mode or "auto")
        blocks = [t.model.transformer_blocks, t.model.single_transformer_blocks] if offload_blocks else []
        services.attach_patcher(t, t.model, size=_bytes(t.model, blocks))
        if status:
            services.show_text(node_id, f"loaded {t.name}\n{status}")
        return io.NodeOutput(t)


# What a missing folder must hold, by the loader that reads it (for the message that says where to put it).
_FOLDER_CONTENTS = {
    "text encoder": "config.json, the tokenizer files and the weights; for FLUX.2 [dev], the text_encoder/ and "
                    "tokenizer/ folders of black-forest-labs/FLUX.2-dev",
    "transformer": "a diffusers FLUX.2 folder with transformer/ in it",
    "VAE": "a diffusers FLUX.2 folder with vae/ in it",
}
# node id -> (input, folders, what): the loaders whose choice ``missing_model`` checks (web_routes serves it)
MODEL_INPUTS = {
    "Flux2KitTransformerLoader": ("model_name", services.TRANSFORMER_FOLDERS, "transformer"),
    "Flux2KitTextEncoderLoader": ("text_encoder_name", services.TEXT_ENCODER_FOLDERS, "text encoder"),
    "Flux2KitVAELoader": ("vae_name", services.VAE_FOLDERS, "VAE"),
}


def missing_model(folders: tuple[str, ...], choice: str, what: str) -> str | None:
    """None when a loader's choice is on disk, else what is missing and where to put it."""
    try:
        services.resolve_model(folders, choice)
        return None
    except Flux2KitError as e:
        if not str(choice).endswith("/"):
            return str(e)
    roots = services.model_roots(folders)
    if not roots:
        return f"The {what} folder {choice!r} is not in ComfyUI's models folders ({_FOLDER_CONTENTS[what]})."
    others = f" (or in {', '.join(roots[1:])})" if len(roots) > 1 else ""
    return (f"The {what} folder {choice!r} is missing. Put it in {roots[0]}{others}, so that "
            f"{os.path.join(roots[0], choice.rstrip('/'))}{os.sep} holds {_FOLDER_CONTENTS[what]}; then press R to "
            f"refresh the list.")


def _text_encoder_choices() -> list[str]:
    """Model folders and single files; not the weight files inside a listed folder."""
    choices = services.list_models(services.TEXT_ENCODER_FOLDERS, component="text_encoder")
    folders = tuple(c for c in choices if c.endswith("/"))
    return [c for c in choices if c.endswith("/") or not c.startswith(folders)]


def _comfy_tokenizer(path: str) -> str | None:
    """ComfyUI's own Qwen tokenizer folder for a Qwen3 single file (or GGUF) that carries none, as ComfyUI uses it."""
    if not os.path.isfile(path):
        return None
    if is_gguf(path):
        if not _qwen3_gguf_without_vocabulary(path):
            return None
    elif not any(k.endswith("self_attn.q_norm.weight") for k in _header_keys(path)):
        return None
    try:
        import comfy.text_encoders
    except ImportError:
        return None
    # A namespace package in ComfyUI (no __init__.py, so no __file__): look along its __path__.
    for root in getattr(comfy.text_encoders, "__path__", []):
        folder = os.path.join(root, "qwen25_tokenizer")
        if os.path.isdir(folder):
            return folder
    return None


def _qwen3_gguf_without_vocabulary(path: str) -> bool:
    try:
        with GGUFFile(path) as f:
            return f.architecture == "qwen3" and not f.array_length("tokenizer.ggml.tokens")
    except Exception:  # the loader reports a bad file itself
        return False


def _header_keys(path: str) -> list[str]:
    try:
        return list(read_header(path).tensors)
    except Exception:  # the loader reports a bad file itself
        return []


class TextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitTextEncoderLoader",
            display_name="FLUX.2 Load Text Encoder (flux2kit)",
            category=CATEGORY,
            description="Loads FLUX.2 [dev]'s Mistral-Small-3 text encoder from a Hugging Face folder (config, "
                        "weights and tokenizer) or a diffusers FLUX.2 folder; only the 30 layers FLUX.2 reads. "
                        "Also ComfyUI's single files (mistral_3_small_flux2_*.safetensors, qwen_3_*.safetensors), bf16 or FP8, "
                        "and llama.cpp GGUF files of Mistral-Small-3.x or Qwen3 (kept quantized; the node shows their "
                        "quantization mix and memory before loading).",
            inputs=[
                io.Combo.Input("text_encoder_name",
                               options=_text_encoder_choices(),
                               tooltip="A folder in models/text_encoders (with config.json and tokenizer files), a "
                                       "diffusers FLUX.2 folder in models/diffusers, a ComfyUI single file "
                                       "(mistral_3_small_flux2_bf16/fp8.safetensors; qwen_3_*.safetensors use ComfyUI's "
                                       "Qwen tokenizer), or a GGUF in models/text_encoders or models/clip (e.g. "
                                       "Mistral-Small-3.2-24B-Instruct-2506-Q4_K_M.gguf, Qwen3-4B-Q8_0.gguf)."),
                io.Combo.Input("weight_mode", options=list(WEIGHT_MODE_LABELS), default="fp8 as stored", optional=True,
                               tooltip="fp8 as stored: an FP8 file stays FP8 in memory, a GGUF stays quantized, a bf16 "
                                       "one stays bf16. bf16: expand FP8 or GGUF layers at load. fp8 quantize on load: the "
                                       "attention and MLP linears become FP8 while loading (about half the memory of bf16)."),
                io.Combo.Input("parts", options=list(PARTS_LABELS), default="FLUX.2 layers (encode only)",
                               optional=True,
                               tooltip="FLUX.2 layers: the 30 of Mistral's 40 layers FLUX.2 reads (the default). full "
                                       "model, for prompt upsampling: all 40 layers, the LM head and the vision tower, "
                                       "for FLUX.2 Prompt Upsample; it encodes exactly as the default. FLUX.2 [dev]'s "
                                       "Mistral-Small-3.x takes 48 GB in bf16, 13.3 GB more (about 7.8 GB more with FP8 "
                                       "layers; the head and vision tower stay bf16). It needs the Hugging Face folder "
                                       "(text_encoder/ + tokenizer/) or a whole llama.cpp GGUF (text only): ComfyUI's "
                                       "single files have no LM head. text only: without the vision tower (0.9 GB less; "
                                       "references cannot be read). [klein]'s Qwen3 does not upsample."),
            ],
            outputs=[TextEncoder.Output(display_name="text_encoder", tooltip="The loaded text encoder.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, text_encoder_name, weight_mode=None, parts=None):
        """When the prompt is queued, before anything runs: a missing file or folder, with where to put it (a
        folder is not a model file name, so the frontend's own missing-model check cannot see it)."""
        return missing_model(services.TEXT_ENCODER_FOLDERS, text_encoder_name, "text encoder") or True

    @classmethod
    def fingerprint_inputs(cls, text_encoder_name, weight_mode=None, parts=None):
        return services.file_fingerprint(services.TEXT_ENCODER_FOLDERS, text_encoder_name)

    @classmethod
    def execute(cls, text_encoder_name, weight_mode=None, parts=None) -> io.NodeOutput:
        path = services.resolve_model(services.TEXT_ENCODER_FOLDERS, text_encoder_name)
        kind = PARTS_LABELS.get(parts or "", "flux2")
        dtype = default_dtype(services.compute_device())
        options = dict(device=services.offload_device(), dtype=dtype,
                       weights=WEIGHT_MODE_LABELS.get(weight_mode or "", "as_stored"), tokenizer=_comfy_tokenizer(path))
        node_id = cls.hidden.unique_id if cls.hidden else None
        if kind == "flux2":
            status = _announce(node_id, path, "text_encoder", dtype, weight_mode)
            te = load_text_encoder(path, **options)
            services.attach_patcher(te, te.model, size=_bytes(te.model))
            if status:
                services.show_text(node_id, f"loaded\n{status}")
            return io.NodeOutput(te)
        te = load_full_text_encoder(path, vision=kind == "full", **options)
        whole, read = te.memory()
        services.attach_patcher(te, te.generator, size=whole)
        status = (f"full model ({'with' if te.has_vision else 'without'} vision tower): {_size(whole)}, "
                  f"{_size(whole - read)} more than the layers FLUX.2 reads")
        services.show_text(node_id, "\n".join([status, *te.notes]))
        for note in te.notes:
            services.log.warning("flux2kit: %s", note)
        return io.NodeOutput(te)


class VAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitVAELoader",
            display_name="FLUX.2 Load VAE (flux2kit)",
            category=CATEGORY,
            description="Loads the FLUX.2 VAE from a single file (flux2-vae.safetensors) or a diffusers folder.",
            inputs=[
                io.Combo.Input("vae_name", options=services.list_models(services.VAE_FOLDERS, component="vae"),
                               tooltip="A file in models/vae (e.g. flux2-vae.safetensors) or a diffusers folder."),
            ],
            outputs=[VAE.Output(display_name="vae", tooltip="The loaded FLUX.2 VAE.")],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name):
        return services.file_fingerprint(services.VAE_FOLDERS, vae_name)

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        path = services.resolve_model(services.VAE_FOLDERS, vae_name)
        vae = load_vae(path, device=services.offload_device(), dtype=default_dtype(services.compute_device()))
        services.attach_patcher(vae, vae.model, size=_bytes(vae.model))
        return io.NodeOutput(vae)


NODES = [TransformerLoader, TextEncoderLoader, VAELoader]
