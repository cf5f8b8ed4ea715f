"""FLUX.2 LoRA files: read one, tell its format from keys and shapes, convert it to canonical adapters.

Formats (detected per layer from the key names and tensor shapes, never from the file name):

- ComfyUI / BFL-native (ai-toolkit, OneTrainer's Comfy export): BFL layer names
  (``double_blocks.3.img_attn.qkv``, ``single_blocks.7.linear1``, ``final_layer.adaLN_modulation.1`` ...)
  under ``diffusion_model.``, ``model.diffusion_model.``, ``base_model.model.`` or no prefix, with
  ``lora_A/lora_B`` or ``lora_down/lora_up`` and an optional ``alpha``.
- kohya / musubi: ``lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight`` + ``.alpha``; also
  ``lora_transformer_`` / ``lycoris_`` + underscored diffusers names (what ComfyUI accepts).
- diffusers / PEFT (SimpleTuner, diffusers' trainers): ``transformer.transformer_blocks.3.attn.to_q.lora_A.weight``
  ..., the scale from the ``lora_adapter_metadata`` header entry (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``) as peft computes it; without metadata scale 1.
- Adapter kinds in any of these namings: LoRA, LoKr (``lokr_w1``/``lokr_w2``, each optionally
  ``_a``/``_b`` decomposed), full deltas (``diff``), and DoRA (ComfyUI/LyCORIS ``dora_scale`` or PEFT
  ``lora_magnitude_vector``).

The canonical form is one :class:`LoraAdapter` per layer of the file, keyed by the module path in
flux2kit's transformer (diffusers' ``Flux2Transformer2DModel`` names). A BFL fused q|k|v layer is
keyed ``attn.to_qkv`` / ``attn.to_added_qkv`` (the fused layers a BFL/ComfyUI checkpoint loads
into), a diffusers ``to_q`` stays ``attn.to_q``; ``models/lora.py`` fits either onto the loaded model.
BFL's ``final_layer.adaLN_modulation.1`` stores shift|scale rows where the model's ``norm_out.linear``
wants scale|shift: such adapters carry ``swap_halves`` (diffusers' LoRA converter forgets this).

Scale rules (what the trainers meant, and what ComfyUI / diffusers compute where they are right; the
name table and the formulas are in docs/loras.md):
LoRA ``alpha / rank`` with rank = rows of the down (A) matrix, 1 without alpha; LoKr ``alpha / rank``
only when a factor is decomposed (rank of ``w2_b``, else ``w1_b``), otherwise 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor

from ..errors import Flux2KitError, UnsupportedFormatError
from .safetensors import TensorFile
from .transformer_checkpoint import map_bfl_key

log = logging.getLogger("flux2kit")

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

# Widths (hidden size) of the released models; a LoRA's layer shapes give its width.
WIDTH_MODELS = {6144: "FLUX.2 [dev]", 3072: "FLUX.2 [klein] 4B", 4096: "FLUX.2 [klein] 9B"}

# Key suffix -> part name. Longest first, so ".lora_A.default.weight" wins over ".weight".
_PARTS = {
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_B.bias": "bias", ".lora_up.bias": "bias", ".diff_b": "bias",
    ".lora_magnitude_vector": "magnitude", ".dora_scale": "dora_scale", ".alpha": "alpha", ".diff": "diff",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".hada_w1_a": "loha", ".hada_w1_b": "loha", ".hada_w2_a": "loha", ".hada_w2_b": "loha",
    ".hada_t1": "loha", ".hada_t2": "loha",
    ".oft_blocks": "oft", ".oft_diag": "oft", ".rescale": "oft", ".a1.weight": "glora", ".b1.weight": "glora",
}
_SUFFIXES = sorted(_PARTS, key=len, reverse=True)
_UNSUPPORTED_KINDS = {"loha": "LoHa (hada_*)", "oft": "OFT/BOFT (oft_*)", "glora": "GLoRA",
                      "mid": "LoCon with a Tucker middle (lora_mid), a convolution adapter"}

# Prefixes of dotted names (BFL or diffusers) and of underscored (kohya-style) names.
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
_UNDERSCORED_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# FLUX.2's linear layers in diffusers names (relative to the transformer). to_qkv / to_added_qkv are the
# fused double-block projections a BFL file holds (flux2kit keeps them fused when loading such files).
_DIFFUSERS_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_qkv", "attn.to_out.0", "attn.add_q_proj",
                     "attn.add_k_proj", "attn.add_v_proj", "attn.to_added_qkv", "attn.to_add_out", "ff.linear_in",
                     "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
_DIFFUSERS_SINGLE = ("attn.to_qkv_mlp_proj", "attn.to_out")
_DIFFUSERS_TOP = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                  "time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
                  "time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2",
                  "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                  "single_stream_modulation.linear")
# BFL's names of the same layers.
_BFL_DOUBLE = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0",
               "txt_mlp.2")
_BFL_SINGLE = ("linear1", "linear2")
_BFL_TOP = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
            "guidance_in.out_layer", "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
            "single_stream_modulation.lin", "final_layer.linear", "final_layer.adaLN_modulation.1")
_FUSED = {"img_attn.qkv": "attn.to_qkv", "txt_attn.qkv": "attn.to_added_qkv"}
SWAPPED_BFL_LAYER = "final_layer.adaLN_modulation.1"

# Layer names that only other models have (checked on the file's names with '.' or '_').
_FLUX1_MARKERS = ("img_mod.lin", "txt_mod.lin", "img_mod_lin", "txt_mod_lin", "vector_in", "time_text_embed",
                  "norm1_context", "norm1.linear", "norm1_linear", "ff.net.", "ff_net_", "proj_mlp")
_FLUX1_SINGLE = re.compile(r"single_(?:transformer_)?blocks[._]\d+[._](?:modulation[._]lin|norm[._]linear|attn[._]to_[qkv]$"
                           r"|proj_out)")
_SD_MARKERS = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block",
               "joint_blocks", "conditioner")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te.", "te1.", "te2.", "te_", "clip_l",
                          "clip_g", "t5xxl", "text_model")
_TEXT_ENCODER_MARKERS = ("self_attn", "mlp.gate_proj", "mlp_gate_proj", "mlp.up_proj", "mlp.down_proj",
                         "embed_tokens", "language_model", "encoder.block", "encoder_block")


@dataclass
class LoraAdapter:
    """One layer of a LoRA file in canonical form: what to add to which module of the transformer.

    ``kind`` "lora": ``tensors["down"]`` (rank, in), ``tensors["up"]`` (out, rank); "lokr": ``w1`` (or
    ``w1_a``/``w1_b``) and ``w2`` (or ``w2_a``/``w2_b``), delta ``kron(w1, w2)``; "full": ``diff`` (out, in).
    ``scale`` is the file's own factor (alpha / rank, ...), strength not included. ``dora`` is
    ``("comfy", dora_scale)`` ((1, in) or (out, 1)) or ``("peft", magnitude)`` (out,).
    """

    target: str  # module path in flux2kit's transformer
    source: str  # the layer's name in the file (for messages)
    kind: str
    tensors: dict[str, Tensor]
    scale: float = 1.0
    rank: int | None = None
    alpha: float | None = None
    swap_halves: bool = False  # output rows are BFL's shift|scale; the module wants scale|shift
    dora: tuple[str, Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the delta this adapter adds."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["up"].shape[0]), int(t["down"].shape[1])
        if self.kind == "full":
            return int(t["diff"].shape[0]), int(t["diff"].shape[1])
        w1, w2 = lokr_factor(t, 1, shape_only=True), lokr_factor(t, 2, shape_only=True)
        return int(w1[0] * w2[0]), int(w1[1] * w2[1])

    @property
    def nbytes(self) -> int:
        extra = self.dora[1].numel() * self.dora[1].element_size() if self.dora else 0
        return extra + sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class LoraFile:
    """A LoRA file read and converted: its adapters and what the file says about itself."""

    name: str
    path: str
    format: str  # e.g. "ComfyUI/BFL (diffusion_model., lora_down/lora_up + alpha)"
    adapters: list[LoraAdapter]
    layers_in_file: int  # layer groups in the file (its own names), transformer and text encoder
    not_applied: dict[str, list[str]] = field(default_factory=dict)  # reason -> the file's layer names
    metadata: dict[str, str] = field(default_factory=dict)
    width: int | None = None  # hidden size of the model the LoRA was trained on

    @property
    def model_name(self) -> str:
        """What the layer widths say the LoRA was made for."""
        return WIDTH_MODELS.get(self.width, f"a FLUX.2-architecture model {self.width} wide")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.adapters)

    def summary(self) -> str:
        """"48 of 48 layers, rank 16, alpha 16" (mixed ranks listed), counted in the file's own layers."""
        applied = len({a.source for a in self.adapters})
        parts = [f"{applied} of {self.layers_in_file} layers"]
        kinds = Counter(("DoRA " if a.dora else "") + {"lora": "LoRA", "lokr": "LoKr", "full": "full"}[a.kind]
                        for a in self.adapters)
        if set(kinds) != {"LoRA"}:
            parts.append(", ".join(f"{k} x{n}" if len(kinds) > 1 else k for k, n in sorted(kinds.items())))
        parts.append(_counted("rank", Counter(a.rank for a in self.adapters if a.rank is not None)))
        alphas = Counter(_num(a.alpha) for a in self.adapters if a.alpha is not None)
        parts.append(_counted("alpha", alphas) if alphas else "no alpha (scale 1)")
        return ", ".join(p for p in parts if p)

    def warnings(self) -> list[str]:
        """What of the file is not applied, one line per reason, with counts and examples."""
        out = []
        for reason, names in self.not_applied.items():
            out.append(f"{len(names)} of {self.layers_in_file} layers not applied ({reason}), e.g. "
                       f"{', '.join(names[:3])}")
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _counted(what: str, counts: Counter) -> str:
    if not counts:
        return ""
    if len(counts) == 1:
        return f"{what} {_num(next(iter(counts)))}"
    listed = ", ".join(f"{_num(v)} ({n} layers)" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"mixed {what}s: {listed}"


# ----------------------------------------------------------------------------------------------
# Reading


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA ``.safetensors`` file and convert it (see the module docstring); pickles are refused unopened."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if name.lower().endswith(PICKLE_EXTENSIONS):
        raise UnsupportedFormatError(
            f"{name} is a pickle file. flux2kit never opens pickles (a pickle can run code when it is loaded); "
            "download the .safetensors version of this LoRA.")
    with TensorFile.open(path) as files:
        keys = files.keys()
        metadata = files.metadata
        groups, unknown = group_keys(keys)
        wanted = {key for stem, parts in groups.items() if classify_stem(stem)[0] == "transformer"
                  for key in parts.values()}
        state = {k: files.get(k) for k in keys if k in wanted}
    return convert_lora(state, metadata, name=name, path=path, all_keys=keys)


def group_keys(keys) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``({layer stem: {part: full key}}, keys with no known LoRA suffix)``."""
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key[: -len(suffix)], {})[_PARTS[suffix]] = key
    return groups, unknown


# ----------------------------------------------------------------------------------------------
# Layer names -> canonical targets, one function per naming


def _split_prefix(stem: str) -> tuple[str, str, str]:
    """(prefix, rest, style) with style "dotted" or "underscored"."""
    for p in _UNDERSCORED_PREFIXES:
        if stem.startswith(p):
            return p, stem[len(p):], "underscored"
    for p in _DOTTED_PREFIXES:
        if stem.startswith(p):
            return p, stem[len(p):], "dotted"
    return "", stem, "dotted"


def bfl_target(name: str) -> tuple[str, bool] | None:
    """(canonical target, swap_halves) of a BFL layer name (no prefix), or None."""
    m = re.fullmatch(r"double_blocks\.(\d+)\.(.+)", name)
    if m and m.group(2) in _FUSED:
        return f"transformer_blocks.{m.group(1)}.{_FUSED[m.group(2)]}", False
    if not (name in _BFL_TOP or (m and m.group(2) in _BFL_DOUBLE)
            or (re.fullmatch(r"single_blocks\.\d+\.(.+)", name) and name.rsplit(".", 1)[-1] in _BFL_SINGLE)):
        return None
    targets = map_bfl_key(name + ".weight")
    if len(targets) != 1:
        return None
    return targets[0].module, name == SWAPPED_BFL_LAYER


def diffusers_target(name: str) -> tuple[str, bool] | None:
    """(canonical target, False) of a diffusers layer name (no prefix), or None."""
    if name in _DIFFUSERS_TOP:
        return name, False
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
    if m and m.group(3) in (_DIFFUSERS_DOUBLE if m.group(1) == "transformer_blocks" else _DIFFUSERS_SINGLE):
        return name, False
    return None


def _underscored(names) -> dict[str, str]:
    return {n.replace(".", "_"): n for n in names}


_U_BFL_DOUBLE, _U_BFL_SINGLE, _U_BFL_TOP = (_underscored(x) for x in (_BFL_DOUBLE, _BFL_SINGLE, _BFL_TOP))
_U_DIF_DOUBLE, _U_DIF_SINGLE, _U_DIF_TOP = (_underscored(x) for x in (_DIFFUSERS_DOUBLE, _DIFFUSERS_SINGLE,
                                                                       _DIFFUSERS_TOP))


def underscored_name(name: str) -> str | None:
    """The dotted layer name of a kohya-style underscored one (BFL or diffusers naming), or None."""
    for table in (_U_BFL_TOP, _U_DIF_TOP):
        if name in table:
            return table[name]
    m = re.fullmatch(r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)_(\d+)_(.+)", name)
    if m is None:
        return None
    kind, idx, inner = m.groups()
    table = {"double_blocks": _U_BFL_DOUBLE, "single_blocks": _U_BFL_SINGLE, "transformer_blocks": _U_DIF_DOUBLE,
             "single_transformer_blocks": _U_DIF_SINGLE}[kind]
    return f"{kind}.{idx}.{table[inner]}" if inner in table else None


def classify_stem(stem: str) -> tuple[str, tuple[str, bool] | None, str]:
    """("transformer", (target, swap), naming) | ("text_encoder" | "flux1" | "sd" | "unknown", None, naming)."""
    prefix, rest, style = _split_prefix(stem)
    lowered = stem.lower()
    if style == "underscored":
        dotted = underscored_name(rest)
        naming = "kohya" if prefix == "lora_unet_" else "lycoris"
    else:
        dotted, naming = rest, None
    if dotted is not None:
        found = bfl_target(dotted)
        if found is not None:
            return "transformer", found, naming or "bfl"
        found = diffusers_target(dotted)
        if found is not None:
            return "transformer", found, naming or "diffusers"
    if lowered.startswith(_TEXT_ENCODER_PREFIXES) or any(m in lowered for m in _TEXT_ENCODER_MARKERS):
        return "text_encoder", None, naming or "?"
    if any(m.lower() in lowered for m in _FLUX1_MARKERS) or _FLUX1_SINGLE.search(stem):
        return "flux1", None, naming or "?"
    if any(m in lowered for m in _SD_MARKERS):
        return "sd", None, naming or "?"
    return "unknown", None, naming or "?"


# ----------------------------------------------------------------------------------------------
# Adapters from a layer's tensors


def lokr_factor(t: dict[str, Tensor], i: int, shape_only: bool = False):
    """Factor ``w{i}`` of a LoKr layer (or its shape): stored whole, or as ``w{i}_a @ w{i}_b``."""
    if f"lokr_w{i}" in t:
        w = t[f"lokr_w{i}"]
        return tuple(w.shape) if shape_only else w
    a, b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
    return (a.shape[0], b.shape[1]) if shape_only else a.float() @ b.float()


def _alpha(parts: dict[str, Tensor]) -> float | None:
    a = parts.get("alpha")
    return None if a is None else float(a.float().reshape(-1)[0])


def _peft_alpha(module: str, meta: dict | None) -> tuple[float | None, bool]:
    """(alpha from the PEFT adapter metadata for ``module``, use_rslora); peft's own pattern rule."""
    if not meta:
        return None, False
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        # peft's get_pattern_key: a pattern matches the end of the module name at a dot boundary.
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value), bool(meta.get("use_rslora"))
    return float(meta.get("lora_alpha", 8)), bool(meta.get("use_rslora"))


def _check_2d(source: str, parts: dict[str, Tensor], names) -> None:
    for n in names:
        if n in parts and parts[n].ndim != 2:
            raise Flux2KitError(f"LoRA layer {source}: {n} has shape {tuple(parts[n].shape)}; FLUX.2's layers are "
                                "linear, so a 2-D matrix is expected (this adapter is for a convolution model).")


def make_adapter(source: str, target: str, swap: bool, parts: dict[str, Tensor], *,
                 peft_meta: dict | None = None, module_name: str = "") -> LoraAdapter:
    """The canonical adapter of one file layer; clear errors for incomplete or mismatched tensors."""
    for part, label in _UNSUPPORTED_KINDS.items():
        if part in parts:
            raise UnsupportedFormatError(
                f"LoRA layer {source} is a {label} adapter, which flux2kit does not apply; it applies LoRA, LoKr, "
                "DoRA and full (diff) layers. ComfyUI's Load LoRA node applies LoHa/OFT.")
    if "lokr_t2" in parts:
        raise UnsupportedFormatError(f"LoRA layer {source} is a Tucker-decomposed LoKr (lokr_t2), a convolution "
                                     "adapter; FLUX.2's layers are linear.")
    alpha = _alpha(parts)
    dora = None
    if "dora_scale" in parts:
        dora = ("comfy", parts["dora_scale"])
    elif "magnitude" in parts:
        dora = ("peft", parts["magnitude"])
    if "down" in parts or "up" in parts:
        if "down" not in parts or "up" not in parts:
            have, miss = ("down (lora_A)", "up (lora_B)") if "down" in parts else ("up (lora_B)", "down (lora_A)")
            raise Flux2KitError(f"LoRA layer {source} has {have} but no {miss}: the file is incomplete; "
                                "download it again.")
        _check_2d(source, parts, ("down", "up"))
        down, up = parts["down"], parts["up"]
        rank = int(down.shape[0])
        if up.shape[1] != rank:
            raise Flux2KitError(f"LoRA layer {source}: the down matrix has rank {rank} but the up matrix "
                                f"{tuple(up.shape)} has rank {up.shape[1]}: the file is damaged or mixes two LoRAs.")
        rslora = False
        if alpha is None and peft_meta:
            alpha, rslora = _peft_alpha(module_name, peft_meta)
        scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)
        return LoraAdapter(target, source, "lora", {"down": down, "up": up}, scale, rank, alpha, swap, dora)
    if any(p.startswith("lokr_") for p in parts):
        for i in (1, 2):
            if f"lokr_w{i}" not in parts and not (f"lokr_w{i}_a" in parts and f"lokr_w{i}_b" in parts):
                raise Flux2KitError(f"LoKr layer {source} has no complete factor w{i} (lokr_w{i}, or lokr_w{i}_a and "
                                    f"lokr_w{i}_b): the file is incomplete; download it again.")
        _check_2d(source, parts, [p for p in parts if p.startswith("lokr_")])
        tensors = {k: v for k, v in parts.items() if k.startswith("lokr_")}
        # LyCORIS (and ComfyUI, diffusers): alpha counts only when a factor is decomposed.
        rank = (int(parts["lokr_w2_b"].shape[0]) if "lokr_w2_b" in parts
                else int(parts["lokr_w1_b"].shape[0]) if "lokr_w1_b" in parts else None)
        scale = alpha / rank if alpha is not None and rank else 1.0
        return LoraAdapter(target, source, "lokr", tensors, scale, rank, alpha if rank else None, swap, dora)
    if "diff" in parts:
        _check_2d(source, parts, ("diff",))
        return LoraAdapter(target, source, "full", {"diff": parts["diff"]}, 1.0, None, None, swap, dora)
    raise Flux2KitError(f"LoRA layer {source} has only {', '.join(sorted(parts))}: no weights to apply "
                        "(the file is incomplete).")


# ----------------------------------------------------------------------------------------------
# The whole file


_FORMAT_NAMES = {"bfl": "ComfyUI/BFL", "kohya": "kohya/musubi", "diffusers": "diffusers/PEFT",
                 "lycoris": "LyCORIS/ComfyUI (diffusers names)"}


def _peft_metadata(metadata: dict[str, str]) -> dict | None:
    """diffusers' ``lora_adapter_metadata`` for the transformer (keys without "transformer."), or None."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        log.warning("lora_adapter_metadata in the LoRA file is not JSON; ignored (scale 1).")
        return None
    if not isinstance(meta, dict):
        return None
    scoped = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    return scoped or None


def _width(adapter: LoraAdapter) -> int:
    """The model width (hidden size) an adapter's shape implies."""
    out, inp = adapter.shape
    t = adapter.target
    by_out = t.endswith(("x_embedder", "context_embedder", "linear_1", "linear_out")) or \
        re.fullmatch(r"single_transformer_blocks\.\d+\.attn\.to_out", t) is not None
    if t.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "add_q_proj", "add_k_proj", "add_v_proj")):
        return inp
    return out if by_out else inp


def _flux1_by_shape(adapters: list[LoraAdapter]) -> str | None:
    """FLUX.1 shares BFL's names but its MLPs are 4x (not 3x gated) wide: name a layer that shows it."""
    for a in adapters:
        out, inp = a.shape
        if a.target.endswith("ff.linear_in") or a.target.endswith("ff_context.linear_in"):
            if out == 4 * inp:
                return a.source
        if a.target.endswith("attn.to_qkv_mlp_proj") and out == 7 * inp:
            return a.source
    return None


def _refuse_other_models(name: str, counts: Counter, examples: dict, metadata: dict, adapters) -> None:
    base = " ".join(str(metadata.get(k, "")) for k in ("modelspec.architecture", "ss_base_model_version",
                                                        "base_model", "ss_sd_model_name")).lower()
    flux1_layer = _flux1_by_shape(adapters)
    if counts["flux1"] or flux1_layer or re.search(r"flux[-_.]?1|flux1", base):
        example = (examples.get("flux1") or [flux1_layer or ""])[0]
        raise Flux2KitError(
            f"{name} is a LoRA for FLUX.1 (e.g. its layer {example}), not FLUX.2: the two models' layers differ. "
            "Use a LoRA trained on FLUX.2 ([dev] or [klein]).")
    if counts["sd"] and not adapters:
        raise Flux2KitError(
            f"{name} is a LoRA for Stable Diffusion / SDXL (e.g. its layer {examples['sd'][0]}), not FLUX.2. "
            "Use a LoRA trained on FLUX.2 ([dev] or [klein]).")


def convert_lora(state: dict[str, Tensor], metadata: dict[str, str] | None = None, *, name: str = "<LoRA>",
                 path: str = "", all_keys=None) -> LoraFile:
    """Canonical adapters of a LoRA state dict (any supported format). Pure: the tensors are not copied.

    ``all_keys`` (default: the state's keys) are every key of the file, including the ones ``state``
    leaves out because they are not applied (text encoder); they count in the report.
    """
    metadata = dict(metadata or {})
    groups, unknown_keys = group_keys(list(all_keys if all_keys is not None else state))
    peft_meta = _peft_metadata(metadata)
    adapters: list[LoraAdapter] = []
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}
    namings: Counter = Counter()
    prefixes: Counter = Counter()
    updown: Counter = Counter()
    for stem, parts in groups.items():
        what, found, naming = classify_stem(stem)
        counts[what] += 1
        examples.setdefault(what, []).append(stem)
        if what != "transformer":
            continue
        target, swap = found
        namings[naming] += 1
        prefixes[_split_prefix(stem)[0]] += 1
        if "down" in parts:
            updown["lora_down/lora_up" if parts["down"].endswith(".lora_down.weight") else "lora_A/lora_B"] += 1
        if "bias" in parts:
            counts["bias"] += 1
            examples.setdefault("bias", []).append(stem)
        tensors = {p: state[k] for p, k in parts.items() if p != "bias"}
        module_name = _split_prefix(stem)[1]
        adapters.append(make_adapter(stem, target, swap, tensors, peft_meta=peft_meta, module_name=module_name))
    layers = len(groups) + len(unknown_keys)
    _refuse_other_models(name, counts, examples, metadata, adapters)
    if not adapters:
        if counts["text_encoder"]:
            raise Flux2KitError(
                f"{name} only changes a text encoder ({counts['text_encoder']} layers, e.g. "
                f"{examples['text_encoder'][0]}); flux2kit applies LoRAs to the FLUX.2 transformer only, so it "
                "would change nothing. Use a LoRA trained on the FLUX.2 transformer.")
        shown = (examples.get("unknown", []) + unknown_keys)[:4]
        raise Flux2KitError(
            f"{name}: none of its {layers} layers matches a FLUX.2 transformer layer (e.g. {', '.join(shown)}). "
            "It is not a FLUX.2 LoRA, or it uses a naming flux2kit does not know.")
    not_applied = {}
    if counts["text_encoder"]:
        not_applied["text-encoder layers: flux2kit applies LoRAs to the transformer only"] = examples["text_encoder"]
    if counts["bias"]:
        not_applied["bias deltas: FLUX.2's linear layers have no bias (the weights are applied)"] = examples["bias"]
    leftovers = examples.get("unknown", []) + examples.get("sd", []) + unknown_keys
    if leftovers:
        not_applied["no matching FLUX.2 layer"] = leftovers
    widths = Counter(_width(a) for a in adapters)
    if len(widths) > 1:
        raise Flux2KitError(f"{name} mixes layers of different model sizes (widths {sorted(widths)}): the file is "
                            "damaged or merges two LoRAs of different models.")
    return LoraFile(name=name, path=path, format=_describe(namings, prefixes, updown, adapters),
                    adapters=adapters, layers_in_file=layers, not_applied=not_applied, metadata=metadata,
                    width=next(iter(widths)))


def _describe(namings: Counter, prefixes: Counter, updown: Counter, adapters) -> str:
    """"ComfyUI/BFL (diffusion_model., lora_down/lora_up, alpha)" and the like."""
    details = [prefixes.most_common(1)[0][0] or "no prefix"] if prefixes else []
    if updown:
        details.append(updown.most_common(1)[0][0])
    if any(a.alpha is not None for a in adapters):
        details.append("alpha")
    names = " + ".join(_FORMAT_NAMES.get(n, n) for n, _ in namings.most_common())
    return f"{names} ({', '.join(details)})" if details else names


# ----------------------------------------------------------------------------------------------
# What the file says about its training


_INFO_KEYS = {  # label -> metadata keys, first present wins
    "title": ("modelspec.title", "ss_output_name", "name"),
    "trigger words": ("modelspec.trigger_phrase", "trigger_phrase", "trigger_word", "trigger_words",
                      "ss_trigger_words", "activation_text"),
    "base model": ("modelspec.architecture", "ss_base_model_version", "base_model", "ss_sd_model_name",
                   "modelspec.base_model"),
    "description": ("modelspec.description", "description", "ss_training_comment"),
    "author": ("modelspec.author", "author"),
    "trained with": ("software", "ss_training_software", "modelspec.implementation"),
}
_MAX_INFO = 200


def training_info(metadata: dict[str, str]) -> dict[str, str]:
    """Trigger words, base model, title ... from a LoRA's safetensors metadata (short strings only)."""
    info: dict[str, str] = {}
    for label, keys in _INFO_KEYS.items():
        for k in keys:
            value = str(metadata.get(k, "")).strip()
            if value and value.lower() not in ("none", "null"):
                info[label] = value if len(value) <= _MAX_INFO else value[:_MAX_INFO] + "..."
                break
    tags = _frequent_tags(metadata.get("ss_tag_frequency"))
    if tags:
        info["frequent tags"] = tags
    return info


def _frequent_tags(raw, n: int = 6) -> str:
    """kohya's ss_tag_frequency ({dataset: {tag: count}}) -> "tag1, tag2, ..." (most frequent first)."""
    if not raw:
        return ""
    try:
        data = json.loads(raw)
        total: Counter = Counter()
        for tags in data.values():
            total.update({str(k).strip(): int(v) for k, v in tags.items()})
    except (ValueError, AttributeError, TypeError):
        return ""
    return ", ".join(t for t, _ in total.most_common(n) if t)
