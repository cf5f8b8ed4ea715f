"""llama.cpp's text-model GGUF layout seen in Hugging Face's: names, Q/K rows, config values.

FLUX.2's encoders as llama.cpp writes them: Mistral-Small-3.x ([dev]) with architecture ``llama``
(conversions before mid-2025 and text-only re-uploads) or ``mistral3`` (newer ones), and Qwen3-4B /
8B ([klein]) with architecture ``qwen3``. :class:`LlamaCppTextModel` presents such a file under the
names the Hugging Face model uses (``model.layers.N.self_attn.q_proj.weight`` ...), the same names
ComfyUI's single files have, so the single-file text encoder loader reads it unchanged.

- Names: gguf's own tensor name map (``gguf.get_tensor_name_map``, what transformers' GGUF loader
  uses), inverted for the tensors a Mistral / Qwen3 layer has.
- Q/K rows: llama.cpp's ``LlamaModel`` (which converts Mistral, and ``Mistral3Model`` inherits it)
  permutes the rows of ``q_proj`` / ``k_proj`` from Hugging Face's rotate-half RoPE layout to GPT-J's
  interleaved pairs; :func:`unpermute_rows` undoes it as transformers' GGUF loader does, with the
  head counts from the file. Only rows move, and GGUF blocks run along rows, so this works on packed
  bytes. Qwen3 is converted without the permutation.
- Config values: from the file's ``{arch}.*`` metadata, checked against the tensor shapes.
"""

from __future__ import annotations

import re

import torch

from ..errors import Flux2KitError, UnsupportedFormatError
from .gguf import GGUFFile, GGUFTensor, GGUFTensors

ARCH_FAMILY = {"llama": "mistral", "mistral3": "mistral", "qwen3": "qwen3"}
PERMUTED_ARCHS = ("llama", "mistral3")  # converted by llama.cpp's LlamaModel (or a subclass): Q/K rows permuted
_ARCHES = {"llama": "LLAMA", "mistral3": "MISTRAL3", "qwen3": "QWEN3"}  # gguf.MODEL_ARCH members
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
                "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                "post_attention_layernorm")
PREFIX = "model."
TOKENS_KEY = "tokenizer.ggml.tokens"
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: Hugging Face's Q/K row order -> llama.cpp's (for writing)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows` (transformers' ``_reverse_permute_weights``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_names(arch: str, num_layers: int) -> dict[str, str]:
    """``{Hugging Face tensor name: GGUF tensor name}`` for a Mistral / Qwen3 model of ``num_layers``."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[_ARCHES[arch]], num_layers)
    hf = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    hf += [f"model.layers.{i}.{part}.weight" for i in range(num_layers) for part in _LAYER_PARTS]
    out = {}
    for name in hf:
        mapped = tmap.get_name(name, try_suffixes=(".weight",))
        if mapped is not None:
            out[name] = mapped
    return out


def family_of(files: GGUFFile) -> str:
    """"mistral" or "qwen3" from a GGUF's architecture field; a clear error for any other model."""
    arch = files.architecture
    if arch in ARCH_FAMILY:
        return ARCH_FAMILY[arch]
    keys = files.keys()
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys):
        what, hint = "a FLUX transformer", "Load it with the transformer loader (models/diffusion_models)."
    elif arch in ("t5", "t5encoder", "umt5"):
        what, hint = "a T5 text encoder (FLUX.1)", "FLUX.2 [dev] needs Mistral-Small-3.x; [klein] needs Qwen3."
    elif arch:
        what, hint = f"a GGUF of a {arch!r} model", ("FLUX.2 [dev] needs Mistral-Small-3.x (GGUF architecture llama or "
                                                    "mistral3); FLUX.2 [klein] needs Qwen3-4B/8B (qwen3).")
    else:
        what, hint = "a GGUF without an architecture field", "Use a llama.cpp conversion of Mistral-Small-3.x or Qwen3."
    raise Flux2KitError(f"{files.name} is {what}, not a FLUX.2 text encoder. {hint}")


class LlamaCppTextModel(GGUFTensors):
    """A llama.cpp text-model GGUF under Hugging Face names (``model.layers.N...``), Q/K rows un-permuted."""

    def __init__(self, files: GGUFFile):
        self.file = files
        self.name = files.name
        self.arch = files.architecture
        self.family = family_of(files)
        blocks = {int(m.group(1)) for k in files.keys() if (m := _BLOCK.match(k))}
        self.num_layers = max(blocks) + 1 if blocks else 0
        to_gguf = hf_to_gguf_names(self.arch, self.num_layers)
        present = {g: h for h, g in to_gguf.items() if g in files}
        # Tensors without a Hugging Face twin keep their GGUF names (outside "model.": loaders skip them).
        self._source = {present.get(k, k): k for k in files.keys()}
        self.n_head = self._int("attention.head_count")
        self.n_head_kv = self._int("attention.head_count_kv", self.n_head)

    def _int(self, key: str, default=None):
        value = self.file.field(f"{self.arch}.{key}", default)
        if isinstance(value, list):  # per-layer head counts (some architectures): FLUX.2's encoders use one
            value = max(value)
        return int(value) if value is not None else None

    # -- the GGUFTensors interface -----------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._source)

    def __contains__(self, key: object) -> bool:
        return key in self._source

    def tensor(self, key: str) -> GGUFTensor:
        t = self.file.tensor(self._source[key])
        return GGUFTensor(key, t.ggml_type, t.shape, t.offset, t.nbytes)

    def packed(self, key: str) -> torch.Tensor:
        data = self.file.packed(self._source[key])
        heads = self._permuted_heads(key)
        return data if heads is None else unpermute_rows(data, heads).contiguous()

    def _permuted_heads(self, key: str) -> int | None:
        if self.arch not in PERMUTED_ARCHS:
            return None
        if ".self_attn.q_proj." in key:
            return self.n_head
        if ".self_attn.k_proj." in key:
            return self.n_head_kv
        return None

    # -- what the checkpoint inspection reads --------------------------------------------------------

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    @property
    def has_tokenizer(self) -> bool:
        """Whether the file carries its vocabulary (``tokenizer.ggml.tokens``)."""
        return bool(self.file.array_length(TOKENS_KEY))

    def config_values(self, defaults: dict) -> dict:
        """The language model's config values from the file's metadata, checked against its shapes.

        ``defaults`` fills what a file may leave out (RoPE theta, norm eps, context length).
        """
        if self.n_head is None:
            raise Flux2KitError(f"{self.name} has no {self.arch}.attention.head_count metadata; the file is damaged "
                                "or not a llama.cpp conversion. Download it again.")
        for needed in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                       "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
            if needed not in self._source:
                raise Flux2KitError(f"{self.name} has no {needed} (GGUF: {self._gguf_name(needed)}); the file is "
                                    "incomplete or not a Mistral / Qwen3 text model.")
        vocab, hidden = self.tensor("model.embed_tokens.weight").shape
        q_rows = self.tensor("model.layers.0.self_attn.q_proj.weight").shape[0]
        k_rows = self.tensor("model.layers.0.self_attn.k_proj.weight").shape[0]
        head_dim = self._int("attention.key_length") or q_rows // self.n_head
        if q_rows != self.n_head * head_dim or k_rows != self.n_head_kv * head_dim:
            raise UnsupportedFormatError(
                f"{self.name}: attention widths {q_rows}/{k_rows} do not match {self.n_head}/{self.n_head_kv} heads of "
                f"{head_dim}; this is not Mistral-Small-3.x or Qwen3 as FLUX.2 uses them."
            )
        theta = self.file.field(f"{self.arch}.rope.freq_base", defaults.get("rope_theta"))
        return dict(
            vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=self.num_layers,
            intermediate_size=int(self.tensor("model.layers.0.mlp.gate_proj.weight").shape[0]),
            num_attention_heads=self.n_head, num_key_value_heads=self.n_head_kv, head_dim=int(head_dim),
            rope_theta=float(theta),
            rms_norm_eps=float(self.file.field(f"{self.arch}.attention.layer_norm_rms_epsilon",
                                               defaults.get("rms_norm_eps"))),
            max_position_embeddings=int(self.file.field(f"{self.arch}.context_length",
                                                        defaults.get("max_position_embeddings"))),
        )

    def _gguf_name(self, hf_name: str) -> str:
        return hf_to_gguf_names(self.arch, max(self.num_layers, 1)).get(hf_name, "?")

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "LlamaCppTextModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
