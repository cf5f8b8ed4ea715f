"""A tiny Mistral-Small-3.x text encoder (random weights) and tokenizer, built in code.

The text model keeps the real encoder's shape where it matters to FLUX.2: more than 30 decoder
layers, so hidden state 30 is an un-normed intermediate exactly as in the 40-layer original, and
the Mistral chat format (``[SYSTEM_PROMPT]``, ``[INST]``, list-of-parts message content). The
tokenizer is a byte-level BPE trained on a small built-in corpus, so any Unicode prompt encodes.
"""

from __future__ import annotations

import os

import torch

from ..files.tokenizers import MISTRAL_CHAT_TEMPLATE

# The first special tokens of Mistral's Tekken vocabulary, at their real ids ([IMG] is 10).
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]  # fmt: skip

CORPUS = [
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object attribution and actions without speculation.",
    "A red fox sitting in a snowy forest at dawn, soft golden light, shallow depth of field.",
    "A photograph of a cat wearing a tiny hat, studio lighting, white background.",
    "An astronaut riding a horse on the moon, cinematic, wide angle lens, dramatic shadows.",
    "A bowl of ramen with a soft boiled egg, steam rising, top-down view, warm colours.",
    "The vase is color #02eb3c and stands on a wooden table next to an open window.",
    "A neon sign that says \"OPEN\" above the door of a small cafe on a rainy street at night.",
    "Portrait of an old fisherman with a grey beard, weathered skin, blue knitted cap, harbour behind.",
    "A watercolor painting of mountains and a lake, pastel palette, morning mist over the water.",
    "The person from image 1 standing in the room from image 2, same pose, natural light.",
    "Isometric illustration of a tiny city with trees, cars, bridges and a river, bright colours.",
    "Close-up of a dew drop on a green leaf, macro lens, bokeh background, high detail.",
    "Un chat noir sur un toit de Paris au coucher du soleil, style aquarelle.",
    "Ein roter Apfel auf einem Holztisch, Licht von links, Fotografie.",
    "東京の夜景、ネオンサイン、雨に濡れた道路、映画のような雰囲気。",
    "一只熊猫在竹林里吃竹子，阳光透过树叶，高清摄影。",
    "Кот сидит на подоконнике и смотрит на снег, тёплый свет лампы.",
    "scene, subjects, description, position, action, pose, style, lighting, mood, background, "
    "composition, camera, angle, lens, depth of field, color palette",
    "emoji test: 🦊 🌲 ☀️ — café naïve façade jalapeño über smörgåsbord",
]


def build_tiny_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer with Mistral's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        truncation_side="right",
        model_max_length=131072,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def build_tiny_mistral3(seed: int = 0, hidden_size: int = 128, num_layers: int = 32, *, num_heads: int = 4,
                        num_kv_heads: int = 2, head_dim: int = 32):
    """A random ``Mistral3ForConditionalGeneration`` shaped like FLUX.2 [dev]'s encoder, and its tokenizer.

    Returns ``(model, tokenizer)``; the model is fp32 with weights rounded to bf16, so a bf16 save
    and an fp32 reload hold exactly the same numbers. ComfyUI's Mistral-3 model fixes head_dim at 128 (a class
    attribute of its config), so a tiny encoder meant for ComfyUI takes ``head_dim=128``.
    """
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    if num_layers < 31:
        raise ValueError("num_layers must be >= 31 so that hidden state 30 is un-normed, as in the real encoder")
    tokenizer = build_tiny_tokenizer()
    text_config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
    )
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            # RMSNorm weights start at exactly 1; jitter them so a skipped or misplaced norm shows.
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
    return model, tokenizer


_OLD_PREFIXES = [  # transformers-5 module path -> the pre-4.52 checkpoint layout
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def _old_layout_key(key: str) -> str:
    for new, old in _OLD_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def save_tiny_mistral3(
    model,
    tokenizer,
    folder: str,
    layout: str = "pipeline",
    *,
    key_layout: str = "new",
    max_shard_bytes: int | None = None,
) -> str:
    """Save in Hugging Face layout with bf16 safetensors; returns the folder holding config.json.

    ``layout="pipeline"``: ``folder/text_encoder`` + ``folder/tokenizer`` (diffusers' FLUX.2 repo);
    ``layout="flat"``: config, weights and tokenizer in ``folder`` (a transformers model repo).
    ``key_layout="new"`` writes ``model.language_model.layers.N...`` (transformers 5);
    ``"old"`` writes ``language_model.model.layers.N...`` (checkpoints saved before transformers 4.52).
    ``max_shard_bytes`` splits the weights into shards with an index, like the real 48 GB folder.
    """
    from safetensors.torch import save_file

    if layout not in ("pipeline", "flat"):
        raise ValueError(f"layout must be 'pipeline' or 'flat', not {layout!r}")
    if key_layout not in ("new", "old"):
        raise ValueError(f"key_layout must be 'new' or 'old', not {key_layout!r}")
    os.makedirs(folder, exist_ok=True)
    model_dir = os.path.join(folder, "text_encoder") if layout == "pipeline" else folder
    tok_dir = os.path.join(folder, "tokenizer") if layout == "pipeline" else folder
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(tok_dir, exist_ok=True)

    model.config.save_pretrained(model_dir)
    state = {}
    for key, value in model.state_dict().items():
        name = _old_layout_key(key) if key_layout == "old" else key
        state[name] = value.detach().to(torch.bfloat16).contiguous()
    save_shards(state, model_dir, max_shard_bytes, save_file)
    tokenizer.save_pretrained(tok_dir)
    save_processor_config(model.config, tok_dir)
    return model_dir


def save_processor_config(config, folder: str) -> None:
    """The Pixtral processor files of the real tokenizer folder (Mistral-Small-3.1's layout), for a ``Mistral3Config``.

    Written by hand: transformers' PixtralProcessor, which would save them, needs torchvision.
    """
    import json

    vision = config.vision_config
    image_processor = {
        "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
        "patch_size": {"height": vision.patch_size, "width": vision.patch_size},
        "size": {"longest_edge": vision.image_size}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    }
    processor = {"processor_class": "PixtralProcessor", "patch_size": vision.patch_size,
                 "spatial_merge_size": config.spatial_merge_size, "image_token": "[IMG]",
                 "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    for name, data in (("preprocessor_config.json", image_processor), ("processor_config.json", processor)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)


def save_shards(state: dict, folder: str, max_shard_bytes: int | None, save_file) -> None:
    import json

    if max_shard_bytes is None:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
