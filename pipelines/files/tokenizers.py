"""Tokenizers of FLUX.2's text encoders: Hugging Face tokenizer folders, Mistral's tekken file, chat templates.

A Hugging Face folder holds ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``) and
``tokenizer_config.json``, with the chat template inline or in ``chat_template.jinja`` /
``chat_template.json`` / ``processor_config.json``. ComfyUI's Mistral single file carries Mistral's
``tekken.json`` as a uint8 tensor instead (``tekken_model``); it converts both ways here. A
tokenizer must belong to its encoder: its ids must fit the embedding table and it must have the
family's chat tokens, or prompts would silently encode as another model's.
"""

from __future__ import annotations

import base64
import json
import os
import re

import torch

from ..errors import Flux2KitError
from .text_encoder_checkpoint import FAMILY_MODEL, TEKKEN_KEY, TextEncoderCheckpoint, missing_tokenizer_error

# GPT-2's split pattern: what tokenizers' ByteLevel(use_regex=True) applies.
_BYTELEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Mistral-Small-3.1's template, reduced to what a text-to-image prompt uses: a system message and
# user messages whose content is a string or a list of {"type": "text"|"image", ...} parts.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

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


def tokenizer_for(ckpt: TextEncoderCheckpoint, folder=None):
    """The tokenizer an encoder uses: ``folder`` when given, else its own (tekken inside a Mistral single file,
    or the tokenizer folder next to a Hugging Face encoder), checked against the encoder."""
    if folder is not None:
        if not os.path.isdir(os.fspath(folder)):
            raise Flux2KitError(f"Tokenizer folder not found: {folder}. Give a folder with tokenizer.json or "
                                "vocab.json + merges.txt and tokenizer_config.json.")
        tok = load_tokenizer(os.fspath(folder), ckpt.family)
        where = os.fspath(folder)
    elif ckpt.tokenizer_dir is not None:
        tok = load_tokenizer(ckpt.tokenizer_dir, ckpt.family)
        where = ckpt.tokenizer_dir
    elif TEKKEN_KEY in ckpt.files:
        tok = tokenizer_from_tekken(ckpt.files.get(TEKKEN_KEY))
        where = f"the {TEKKEN_KEY} tensor of {ckpt.files.name}"
    elif ckpt.gguf_tokenizer:
        tok = tokenizer_from_gguf(ckpt.source, ckpt.family)
        where = f"the tokenizer metadata of {ckpt.files.name}"
    else:
        raise missing_tokenizer_error(ckpt.source, ckpt.family)
    if ckpt.single_file and ckpt.family == "qwen3" and "enable_thinking" not in (tok.chat_template or ""):
        tok.chat_template = QWEN3_CHAT_TEMPLATE  # e.g. ComfyUI's qwen25_tokenizer: same vocabulary, older template
    check_tokenizer_belongs(tok, ckpt.family, int(ckpt.config.vocab_size), ckpt.encoder_name, where)
    return tok


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids run past the embedding table belongs to another model: say so before encoding."""
    size = len(tokenizer)
    if size > int(vocab_size):
        raise Flux2KitError(
            f"The tokenizer has {size} tokens but the text encoder in {where} embeds only {vocab_size}: they belong to "
            "different models. Use the tokenizer that ships with this text encoder."
        )


def load_tokenizer(folder: str, family: str = "mistral"):
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


def check_tokenizer_belongs(tok, family: str, rows: int, encoder: str, where: str) -> None:
    """``check_tokenizer_matches`` for any encoder: ``rows`` embedding rows, named ``encoder`` in messages."""
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


# ----------------------------------------------------------------------------------------------
# GGUF vocabularies (tokenizer.ggml.* metadata)

# What FLUX.2 pads with when a file names no padding token (the real tokenizers' own pad tokens).
_FAMILY_PAD = {"mistral": "<pad>", "qwen3": "<|endoftext|>"}


def tokenizer_from_gguf(path: str, family: str):
    """A ``PreTrainedTokenizerFast`` from the vocabulary a llama.cpp GGUF carries in its metadata.

    transformers' GGUF tokenizer code reads and converts it (``get_gguf_tokenizer`` reads the metadata;
    ``add_gguf_special_tokens`` makes control tokens special; ``set_split_regex`` applies the split of
    ``tokenizer.ggml.pre``: tekken for Mistral, qwen2 for Qwen3). Only its byte-level builder is not used
    as is: it makes a ``GPT2Tokenizer`` with GPT-2's default ``<|endoftext|>`` tokens, which a Mistral
    vocabulary lacks, so the tokenizer would gain an id past the embedding table. The chat template is
    the family's own reduced one, as for the tekken file: converters write differing templates into
    GGUFs (tool calls, default system prompts), while FLUX.2 renders one fixed conversation.
    """
    from tokenizers import processors
    from transformers import GPT2Tokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as gguf_tok
    except ImportError:  # older transformers keep their GGUF tokenizer code elsewhere, under other names
        import transformers

        raise Flux2KitError(
            f"Reading the vocabulary inside {os.path.basename(path)} needs transformers 5.24 or newer (installed: "
            f"{transformers.__version__}). Upgrade it (pip install -U transformers), or pass a tokenizer folder "
            f"(tokenizer=... / --tokenizer) of the {FAMILY_MODEL[family]} repository."
        ) from None

    try:
        _, tokenizer_dict, tokenizer_config = gguf_tok.get_gguf_tokenizer(path)
        if tokenizer_dict.get("tokenizer_type") != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {tokenizer_dict.get('tokenizer_type')!r}, not a byte-level BPE")
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
                 for index, token in enumerate(tokenizer_dict["tokens"])}  # as transformers' byte_level_tokenizer
        base = GPT2Tokenizer(vocab=vocab, merges=gguf_tok.get_merges(tokenizer_dict), unk_token=None,
                             bos_token=None, eos_token=None)
        base = gguf_tok.set_split_regex(gguf_tok.add_gguf_special_tokens(base, tokenizer_dict), tokenizer_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise Flux2KitError(
            f"Cannot build the tokenizer {os.path.basename(path)} carries ({e}). Pass a tokenizer folder "
            f"(tokenizer=... / --tokenizer) of the {FAMILY_MODEL[family]} repository instead."
        ) from None
    backend = base.backend_tokenizer
    # Special tokens come from the chat template alone (FLUX.2 tokenizes the rendered chat), never added again.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    named = {k: tokenizer_config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if not named["pad_token"] and _FAMILY_PAD[family] in backend.get_vocab():
        named["pad_token"] = _FAMILY_PAD[family]
    template = QWEN3_CHAT_TEMPLATE if family == "qwen3" else MISTRAL_CHAT_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="right", truncation_side="right", model_max_length=131072,
        chat_template=template, **{k: v for k, v in named.items() if v},
    )


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
        chat_template=chat_template or MISTRAL_CHAT_TEMPLATE, **named,
    )


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
