"""A tiny Qwen3 text encoder (random weights) and tokenizer for FLUX.2 [klein], built in code.

FLUX.2 [klein] reads the hidden states after decoder layers 9, 18 and 27 of Qwen3-4B / Qwen3-8B
(36 layers). The tiny model keeps 28 layers, so hidden state 27 is an un-normed intermediate as
in the original, and Qwen's chat format (``<|im_start|>``, ``<|im_end|>``, an empty
``<think></think>`` block when thinking is disabled). The tokenizer is Qwen2Tokenizer (the class
real Qwen3 folders name) over a byte-level BPE trained on a small built-in corpus.
"""

from __future__ import annotations

import json
import os

import torch

from .text_encoder import CORPUS, save_shards

# Qwen3's special tokens, in their real order (ids differ: the real vocabulary has 151k tokens).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added, not special, as in the real tokenizer

# Qwen3's template reduced to plain chat (no tools, no reasoning content in history); for the
# messages FLUX.2 [klein] encodes it renders exactly what the full template renders.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_tiny_qwen3_tokenizer(vocab_size: int = 1000):
    """A Qwen2Tokenizer (byte-level BPE) with Qwen3's special tokens and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    # The same pre-tokenization Qwen2Tokenizer applies, so the trained merges are the ones it uses.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=131072,
        padding_side="right",
        truncation_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tokenizer


def build_tiny_qwen3(seed: int = 0, hidden_size: int = 64, num_layers: int = 28, *, tie_word_embeddings: bool = True):
    """A random ``Qwen3ForCausalLM`` shaped like FLUX.2 [klein]'s encoder, and its tokenizer.

    Returns ``(model, tokenizer)``; the model is fp32 with weights rounded to bf16, so a bf16 save
    and an fp32 reload hold exactly the same numbers. The text embedding width FLUX.2 sees is
    ``3 * hidden_size``. Qwen3-4B ties its input and output embeddings; so does this by default.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if num_layers < 28:
        raise ValueError("num_layers must be >= 28 so that hidden state 27 is un-normed, as in the real encoder")
    tokenizer = build_tiny_qwen3_tokenizer()
    heads, head_dim = 4, 16
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            # RMSNorm weights (q/k norms too) start at exactly 1; jitter them so a skipped norm shows.
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
    return model, tokenizer


def save_tiny_qwen3(model, tokenizer, folder: str, layout: str = "pipeline", *,
                    max_shard_bytes: int | None = None) -> str:
    """Save in Hugging Face layout with bf16 safetensors; returns the folder holding config.json.

    ``layout="pipeline"``: ``folder/text_encoder`` + ``folder/tokenizer`` (a diffusers FLUX.2
    [klein] repository); ``layout="model"``: config, weights and tokenizer in ``folder`` (a
    transformers model repository such as Qwen/Qwen3-4B). A tied LM head is not written, as
    transformers does not write it either.
    """
    from safetensors.torch import save_file

    if layout not in ("pipeline", "model"):
        raise ValueError(f"layout must be 'pipeline' or 'model', not {layout!r}")
    os.makedirs(folder, exist_ok=True)
    model_dir = os.path.join(folder, "text_encoder") if layout == "pipeline" else folder
    tok_dir = os.path.join(folder, "tokenizer") if layout == "pipeline" else folder
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(tok_dir, exist_ok=True)

    model.config.save_pretrained(model_dir)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {
        key: value.detach().to(torch.bfloat16).contiguous()
        for key, value in model.state_dict().items()
        if not (tied and key == "lm_head.weight")
    }
    save_shards(state, model_dir, max_shard_bytes, save_file)
    tokenizer.save_pretrained(tok_dir)
    return model_dir
