"""Cached reference K/V: attention processors that extract the reference tokens' keys and values once and reuse
them, and the transformer calls that use them.

Two ways references attend while their K/V are extracted (``ref_attention``):

- ``"self"``: FLUX.2 [klein] 9B KV, exactly as diffusers' ``Flux2KleinKVPipeline`` runs it: references come
  first, modulated at timestep 0, and attend only to themselves, so their K/V depend on the references alone
  and can be reused for every step, prompt and seed.
- ``"full"``: the approximation ComfyUI's experimental ``FluxKVCache`` node makes for other models: references
  modulated at timestep 0 attend to everything at the first step, and those K/V are reused afterwards.

Text and image tokens always attend to text, references and image. Cached steps leave the references out of
the input and splice their stored K/V in between the text and image keys.

diffusers' own KV processors (``Flux2KVAttnProcessor``) extract only with self-attending references; one
processor family that does both keeps the two modes on the same code. Without KV arguments the processors
defer to diffusers' default ones, so a plain forward is unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2KVCache,
    Flux2ParallelSelfAttnProcessor,
)

from .lora import LoraTransformer

REF_ATTENTION = ("self", "full")


def _qkv(attn, hidden_states, encoder_hidden_states=None):
    """Queries, keys, values (B, S, heads, dim) of a double block's image and text streams, normalised."""
    if getattr(attn, "fused_projections", False):  # BFL files load with fused q|k|v (one matmul)
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        eq, ek, ev = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                      attn.add_v_proj(encoder_hidden_states))
    heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
    q, k, v, eq, ek, ev = map(heads, (q, k, v, eq, ek, ev))
    q, k = attn.norm_q(q), attn.norm_k(k)
    eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
    return torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)


def _attend(query, key, value, *, num_txt: int, num_ref: int, mode: str, layer_cache, ref_attention: str,
            shared_refs: bool):
    """Attention over [txt, ref, img] (extract) or [txt, img] with the cached reference K/V spliced in (cached)."""
    if mode == "cached":
        k_ref, v_ref = layer_cache.get()
        b = key.shape[0]
        key = torch.cat([key[:, :num_txt], k_ref.expand(b, -1, -1, -1), key[:, num_txt:]], dim=1)
        value = torch.cat([value[:, :num_txt], v_ref.expand(b, -1, -1, -1), value[:, num_txt:]], dim=1)
        return dispatch_attention_fn(query, key, value)
    ref = slice(num_txt, num_txt + num_ref)
    if layer_cache is not None:  # references shared by the batch: one copy, expanded when used
        keep = slice(0, 1) if shared_refs else slice(None)
        layer_cache.store(key[keep, ref].clone(), value[keep, ref].clone())
    if ref_attention == "full":
        return dispatch_attention_fn(query, key, value)
    # "self": text and image attend to everything, references only to themselves (diffusers' KV model)
    q_rest = torch.cat([query[:, :ref.start], query[:, ref.stop:]], dim=1)
    rest = dispatch_attention_fn(q_rest, key, value)
    refs = dispatch_attention_fn(query[:, ref], key[:, ref], value[:, ref])
    return torch.cat([rest[:, :num_txt], refs, rest[:, num_txt:]], dim=1)


class ReferenceKVAttnProcessor(Flux2AttnProcessor):
    """Double-stream blocks: extract or reuse reference K/V; diffusers' default processor otherwise."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 kv_cache=None, kv_cache_mode=None, num_ref_tokens=0, ref_attention="self", shared_refs=False):
        if kv_cache_mode is None or (kv_cache_mode == "extract" and num_ref_tokens == 0):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        num_txt = encoder_hidden_states.shape[1]
        out = _attend(query, key, value, num_txt=num_txt, num_ref=num_ref_tokens, mode=kv_cache_mode,
                      layer_cache=kv_cache, ref_attention=ref_attention, shared_refs=shared_refs)
        out = out.flatten(2, 3).to(query.dtype)
        context, out = out.split_with_sizes([num_txt, out.shape[1] - num_txt], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(context)


class ReferenceKVParallelAttnProcessor(Flux2ParallelSelfAttnProcessor):
    """Single-stream blocks: extract or reuse reference K/V; diffusers' default processor otherwise."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
                 kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0, ref_attention="self", shared_refs=False):
        if kv_cache_mode is None or (kv_cache_mode == "extract" and num_ref_tokens == 0):
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)
        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = torch.split(proj, [3 * attn.inner_dim, proj.shape[-1] - 3 * attn.inner_dim], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = _attend(query, key, value, num_txt=num_txt_tokens, num_ref=num_ref_tokens, mode=kv_cache_mode,
                      layer_cache=kv_cache, ref_attention=ref_attention, shared_refs=shared_refs)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


@contextlib.contextmanager
def reference_kv_processors(model):
    """Our processors on every block for the duration (as diffusers' KV pipeline installs its own); the model's
    own processors are put back afterwards, so a model shared with other nodes is left as it was."""
    blocks = [(b.attn, ReferenceKVAttnProcessor) for b in model.transformer_blocks]
    blocks += [(b.attn, ReferenceKVParallelAttnProcessor) for b in model.single_transformer_blocks]
    saved = [attn.processor for attn, _ in blocks]
    try:
        for attn, cls in blocks:
            attn.set_processor(cls())
        yield
    finally:
        for (attn, _), processor in zip(blocks, saved):
            attn.set_processor(processor)


def cache_bytes(cache: Flux2KVCache | None) -> int:
    """Memory held by a reference K/V cache."""
    if cache is None:
        return 0
    layers = cache.double_block_caches + cache.single_block_caches
    return sum(t.numel() * t.element_size() for c in layers for t in (c.k_ref, c.v_ref) if t is not None)


def bytes_per_token(model, dtype: torch.dtype) -> int:
    """K and V of one reference token in every block: 2 x width x blocks x bytes per number."""
    config = model.config
    blocks = config.num_layers + config.num_single_layers
    width = config.num_attention_heads * config.attention_head_dim
    return 2 * width * blocks * torch.empty((), dtype=dtype).element_size()


def running(transformer):
    """What a transformer's own call runs in: a LoRA stack's hooks or merged weights (nothing for a plain one).
    The calls below go to the diffusers model directly, for the KV arguments the wrapper's call does not take."""
    return transformer.active() if isinstance(transformer, LoraTransformer) else contextlib.nullcontext()


def forward_extract(transformer, x, img_ids, text, text_ids, sigma, guidance, refs, ref_ids, *, ref_attention: str,
                    shared_refs: bool):
    """Velocity for ``x`` with the references prepended (modulated at timestep 0), and their K/V cache."""
    with running(transformer):
        out, cache = transformer.model(
            hidden_states=torch.cat([refs, x], dim=1), encoder_hidden_states=text, timestep=sigma,
            img_ids=torch.cat([ref_ids, img_ids], dim=1), txt_ids=text_ids, guidance=guidance, return_dict=False,
            kv_cache_mode="extract", num_ref_tokens=refs.shape[1],
            joint_attention_kwargs={"ref_attention": ref_attention, "shared_refs": shared_refs})
    return out, cache


def forward_cached(transformer, x, img_ids, text, text_ids, sigma, guidance, cache: Flux2KVCache):
    """Velocity for ``x`` with the references' cached K/V instead of their tokens."""
    with running(transformer):
        return transformer.model(
            hidden_states=x, encoder_hidden_states=text, timestep=sigma, img_ids=img_ids, txt_ids=text_ids,
            guidance=guidance, return_dict=False, kv_cache=cache, kv_cache_mode="cached")[0]
