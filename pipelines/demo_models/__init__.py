"""Tiny FLUX.2-architecture models built in code (random weights), saved in the real file layouts.

Used by the tests, the benchmarks and the demo: the real loading and inference code runs on them.
"""

from __future__ import annotations

import json
import os

# Bump when the demo models change (architecture, seeds, layouts): folders built by an older
# version are rebuilt, folders that match are reused.
DEMO_VERSION = 2
DEMO_MARKER = "flux2kit-demo-models.json"
DEMO_SEED = 0
# Fast settings for the random-weight demo models (commands use them unless told otherwise).
DEMO_STEPS = 4
DEMO_SIZE = (256, 256)
DEMO_PROMPT = "A red fox sitting in a snowy forest at dawn, soft golden light, shallow depth of field."
# ComfyUI's models/ sub-folders and the names of the real downloads, with "tiny" added.
DEMO_FILES = {
    "transformer": "diffusion_models/flux2_dev_tiny_fp8mixed.safetensors",
    "text_encoder": "text_encoders/mistral_3_small_tiny",
    "vae": "vae/flux2-vae-tiny.safetensors",
    "lora": "loras/flux2_dev_tiny_lora.safetensors",
    # the same models as GGUF Q8_0 (ComfyUI-GGUF's layout; llama.cpp's with the vocabulary), for the GGUF workflow
    "transformer_gguf": "diffusion_models/flux2_dev_tiny_q8_0.gguf",
    "text_encoder_gguf": "text_encoders/mistral_3_small_tiny_q8_0.gguf",
}
# What the demo LoRA's safetensors metadata says about its training, as trainers write it.
DEMO_LORA_METADATA = {"modelspec.title": "tiny random style", "modelspec.architecture": "flux-2-dev/lora",
                      "modelspec.trigger_phrase": "tinystyle", "ss_network_dim": "4", "ss_network_alpha": "4"}
DEMO_NOTE = (
    "These are tiny FLUX.2 [dev]-architecture models with RANDOM weights, built by flux2kit for its demo and "
    "tests. They run the real loading and sampling code in seconds on a CPU, but they were never trained: "
    "they make noise-like images, not pictures. For real images download FLUX.2 [dev] (the transformer, "
    "the Mistral-Small-3 text encoder and the VAE)."
)


def demo_model_paths(folder: str) -> dict[str, str]:
    """Where ``build_demo_models`` puts each model in ``folder`` (absolute paths)."""
    root = os.path.abspath(folder)
    return {name: os.path.join(root, *rel.split("/")) for name, rel in DEMO_FILES.items()}


def demo_models_ready(folder: str) -> bool:
    """True when ``folder`` holds a complete demo set of the current version."""
    try:
        with open(os.path.join(folder, DEMO_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("version") == DEMO_VERSION
        and all(os.path.exists(p) for p in demo_model_paths(folder).values())
    )


def build_demo_models(folder: str, *, force: bool = False) -> dict[str, str]:
    """Build the tiny random FLUX.2 [dev] set once in ``folder`` (ComfyUI's models layout); returns the paths.

    The transformer is a ComfyUI FP8 single file, the VAE a single LDM-layout file and the text
    encoder a Hugging Face folder: the forms users download; the transformer and the text encoder
    also as GGUF Q8_0 files. A matching marker means nothing is rebuilt.
    """
    from ..files.gguf_writer import save_gguf_text_encoder
    from ..files.text_encoder_checkpoint import HIDDEN_LAYERS
    from .lora import random_lora, save_lora
    from .gguf import save_tiny_transformer_gguf
    from .text_encoder import build_tiny_mistral3, save_tiny_mistral3
    from .transformer import build_tiny_transformer, save_transformer
    from .vae import build_tiny_vae, save_vae_ldm

    paths = demo_model_paths(folder)
    if not force and demo_models_ready(folder):
        return paths
    marker_path = os.path.join(folder, DEMO_MARKER)
    if os.path.exists(marker_path):
        os.remove(marker_path)  # an interrupted rebuild must not look complete
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)

    transformer = build_tiny_transformer(seed=DEMO_SEED)
    # FLUX.2 [dev] reads three hidden states of the text model side by side.
    text_width = transformer.config.joint_attention_dim // len(HIDDEN_LAYERS)
    text_encoder, tokenizer = build_tiny_mistral3(seed=DEMO_SEED, hidden_size=text_width)
    if len(HIDDEN_LAYERS) * text_encoder.config.text_config.hidden_size != transformer.config.joint_attention_dim:
        raise RuntimeError("the tiny text encoder's embeddings do not fit the tiny transformer's text input")
    save_transformer(transformer, paths["transformer"], "comfy-fp8")
    save_tiny_mistral3(text_encoder, tokenizer, paths["text_encoder"], layout="flat")
    save_tiny_transformer_gguf(transformer, paths["transformer_gguf"], "Q8_0")
    save_gguf_text_encoder(paths["text_encoder"], paths["text_encoder_gguf"], ggml_type="Q8_0")
    save_vae_ldm(build_tiny_vae(seed=DEMO_SEED), paths["vae"])
    save_lora(random_lora(dict(transformer.config), rank=4, seed=DEMO_SEED + 1), paths["lora"], "bfl", alpha=4.0,
              metadata=DEMO_LORA_METADATA)

    with open(os.path.join(folder, "README.txt"), "w", encoding="utf-8") as f:
        f.write(DEMO_NOTE + "\n\nDelete this folder to free the space; `flux2kit demo` builds it again when needed.\n")
    marker = {"version": DEMO_VERSION, "note": DEMO_NOTE, "files": DEMO_FILES}
    with open(marker_path, "w", encoding="utf-8") as f:  # written last: its presence means complete
        json.dump(marker, f, indent=2)
    return paths
