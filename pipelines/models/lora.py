"""LoRAs on a loaded FLUX.2 transformer, without touching its stored weights.

Default: a side branch. Each adapted linear layer (``nn.Linear``, ``FP8Linear``, any module mapping
(..., in) to (..., out)) gets a forward hook that adds ``s * delta(x)`` to its output, e.g.
``s * B(A x)`` for a LoRA: the stored weights, FP8 or not, never change, so nothing is rounded twice,
and removing a LoRA or changing its strength costs nothing. Optional merge mode (``models/lora_merge.py``)
adds the deltas into copies of the weights instead (faster at high ranks).

:func:`apply_loras` returns a :class:`LoraTransformer`: a light object that references the same
loaded base model plus its own LoRA stack. Its hooks (or merged weights) are installed only while it
runs and removed right after, so two LoRA'd variants of one base share every base weight.

Stacks add up relative to the base weights: ``W x + sum_k s_k delta_k(x)``, each LoRA with its own
strength (negative allowed), on/off switch and optional double-/single-block factors.
DoRA follows the file's own library: ``dora_scale`` as ComfyUI computes it (norms of the base
weight for per-row scales, of the merged weight for per-column scales; strength interpolates),
``lora_magnitude_vector`` as peft does (row norms of ``W + s delta``, strength inside).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import Flux2Transformer2DModel
from torch import Tensor, nn

from ..errors import Flux2KitError
from ..files.lora_formats import LoraAdapter, LoraFile, lokr_factor
from .lora_merge import MergedWeights, check_mergeable, dense_weight

log = logging.getLogger("flux2kit")

_SPLIT = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FUSED_OF = {part: (fused, i) for fused, parts in _SPLIT.items() for i, part in enumerate(parts)}
_EPS = torch.finfo(torch.float32).eps  # ComfyUI adds the eps of its fp32 compute dtype to DoRA norms
# Checkpoint variants (files/transformer_checkpoint.py) as messages name them.
VARIANT_NAMES = {"dev": "FLUX.2 [dev]", "klein-4b": "FLUX.2 [klein] 4B", "klein-9b": "FLUX.2 [klein] 9B"}


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of a stack and how to apply it."""

    lora: LoraFile
    strength: float = 1.0
    enabled: bool = True
    double_blocks: float = 1.0  # factor on strength for the double-stream blocks
    single_blocks: float = 1.0  # factor on strength for the single-stream blocks
    merge: bool = False  # add into copies of the weights instead of a side branch
    rounding: str = "nearest"  # merge mode, FP8 layers: "nearest" or "stochastic" (ComfyUI's)

    def strength_for(self, module_path: str) -> float:
        if module_path.startswith("transformer_blocks."):
            return self.strength * self.double_blocks
        if module_path.startswith("single_transformer_blocks."):
            return self.strength * self.single_blocks
        return self.strength

    @property
    def active(self) -> bool:
        return self.enabled and (self.strength != 0.0 and (self.double_blocks, self.single_blocks) != (0.0, 0.0))


# ----------------------------------------------------------------------------------------------
# Fitting adapters onto a model's modules


def _features(module: nn.Module) -> tuple[int, int] | None:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.out_features), int(module.in_features)
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, Tensor) and weight.ndim == 2 else None


def _width(model: nn.Module) -> int:
    return int(model.config.num_attention_heads * model.config.attention_head_dim)


class Binding:
    """One adapter fitted onto one module: rows ``src`` of the adapter's output go to rows ``dst`` of the module's.

    The adapter's rows are in the model's order (BFL shift|scale swapped to scale|shift already);
    ``None`` means all rows.
    """

    def __init__(self, adapter: LoraAdapter, module_path: str, module: nn.Module, src, dst, strength: float):
        self.adapter, self.module_path, self.module = adapter, module_path, module
        self.src, self.dst, self.strength = src, dst, strength
        self.dora: DoraState | None = None
        self.merge = False  # True: merge mode adds it into a weight copy instead
        self._cache: dict = {}

    # -- tensors prepared for a device and dtype (kept: a LoRA runs every step)

    def _rows(self, t: Tensor) -> Tensor:
        """Rows of an output-sized tensor (first dim) in model order, restricted to ``src``."""
        if self.adapter.swap_halves:
            t = torch.cat(t.chunk(2, dim=0)[::-1], dim=0)
        return t if self.src is None else t[self.src[0]:self.src[1]]

    def prepared(self, device, dtype) -> dict[str, Tensor]:
        key = (torch.device(device), dtype)
        if key not in self._cache:
            with torch.inference_mode(False), torch.no_grad():
                self._cache = {key: self._prepare(device, dtype)}  # one device at a time
        return self._cache[key]

    def _prepare(self, device, dtype) -> dict[str, Tensor]:
        a, t = self.adapter, self.adapter.tensors
        if a.kind == "lora":
            up = self._rows(t["up"])
            if self.dora is not None:
                return {"down": t["down"].to(device, dtype), "up": up.to(device, dtype)}
            # A plain LoRA adds (x A^T) (s B)^T straight into the layer's output: scale and strength
            # folded into B once, one matmul-accumulate per call and no temporary of the output's size.
            return {"down": t["down"].to(device, dtype),
                    "up_scaled": (up.float() * (a.scale * self.strength)).to(device, dtype)}
        if a.kind == "full":
            return {"diff": self._rows(t["diff"]).to(device, dtype)}
        return {"w1": lokr_factor(t, 1).to(device, dtype), "w2": lokr_factor(t, 2).to(device, dtype)}

    def release(self) -> None:
        self._cache = {}

    # -- the delta

    def delta(self, x: Tensor) -> Tensor:
        """``delta_W @ x`` for this binding's rows (the file's scale included, strength not): LoKr, full, DoRA."""
        p, a = self.prepared(x.device, x.dtype), self.adapter
        if a.kind == "lora":
            return F.linear(F.linear(x, p["down"]) * a.scale, p["up"])
        if a.kind == "full":
            return F.linear(x, p["diff"]) * a.scale
        w1, w2 = p["w1"], p["w2"]  # kron(w1, w2) @ x == w1 @ X @ w2^T with X = x viewed (in1, in2)
        lead = x.shape[:-1]
        y = torch.matmul(w1, x.reshape(*lead, w1.shape[1], w2.shape[1]) @ w2.t()).reshape(*lead, -1)
        if a.swap_halves:
            y = torch.cat(y.chunk(2, dim=-1)[::-1], dim=-1)
        if self.src is not None:
            y = y[..., self.src[0]:self.src[1]]
        return y * a.scale

    def dense_delta(self) -> Tensor:
        """The scaled delta weight of this binding's rows, fp32 (out rows, in)."""
        a, t = self.adapter, self.adapter.tensors
        if a.kind == "lora":
            d = t["up"].float() @ t["down"].float()
        elif a.kind == "full":
            d = t["diff"].float()
        else:
            d = torch.kron(lokr_factor(t, 1).float(), lokr_factor(t, 2).float())
        return self._rows(d) * a.scale

    def add_to(self, x: Tensor, base_out: Tensor, out: Tensor) -> Tensor:
        """``out`` plus this binding's side branch (``base_out`` is the layer's output without adapters)."""
        if self.dora is not None:
            branch = self.dora.branch(self, x, base_out)
        elif self.adapter.kind == "lora":
            p = self.prepared(x.device, x.dtype)
            h = F.linear(x, p["down"])
            if out.is_contiguous():
                target = _features_of(out.view(-1, out.shape[-1]), self.dst)
                target.addmm_(h.reshape(-1, h.shape[-1]), p["up_scaled"].t())
                return out
            branch = F.linear(h, p["up_scaled"])
        else:
            branch = self.delta(x) * self.strength
        if self.dst is None:
            return out.add_(branch)
        _features_of(out, self.dst).add_(branch)
        return out

    def weight_delta(self, w_rows: Tensor) -> Tensor:
        """What merge mode adds to the module's rows ``dst`` (fp32, ``w_rows`` = the base rows)."""
        if self.dora is None:
            return self.dense_delta() * self.strength
        return self.dora.weight_delta(self, w_rows)


def _rows_of(module_rows: Tensor, dst) -> Tensor:
    return module_rows if dst is None else module_rows[dst[0]:dst[1]]


def _features_of(y: Tensor, dst) -> Tensor:
    """The output features ``dst`` of a layer output (..., out)."""
    return y if dst is None else y.narrow(-1, dst[0], dst[1] - dst[0])


class DoraState:
    """DoRA's norms for one adapter (one file layer), which may span several bindings (split q|k|v)."""

    def __init__(self, adapter: LoraAdapter, bindings: list[Binding]):
        self.adapter, self.bindings = adapter, sorted(bindings, key=lambda b: (b.src or (0, 0))[0])
        self.kind, m = adapter.dora
        m = m.float()
        self.out_axis = self.kind == "peft" or (m.ndim == 2 and m.shape[1] == 1 and m.shape[0] == adapter.shape[0]
                                                 and m.shape[0] != 1)
        m = m.reshape(-1)
        if self.out_axis and adapter.swap_halves:
            m = torch.cat(m.chunk(2)[::-1])
        self.magnitude = m
        self._vectors: dict | None = None

    def _layer_weights(self) -> tuple[Tensor, Tensor]:
        """(W, delta W) of the whole file layer, rows in model order, fp32."""
        w = torch.cat([_rows_of(dense_weight(b.module), b.dst) for b in self.bindings], dim=0)
        full = Binding(self.adapter, "", None, None, None, 1.0).dense_delta()
        return w, full.to(w.device)

    def vectors(self, device) -> dict[str, Tensor]:
        """The norm vectors, computed once from the base weights (before any merged copy is swapped in)."""
        if self._vectors is not None:
            if next(iter(self._vectors.values())).device != torch.device(device):
                self._vectors = {k: t.to(device) for k, t in self._vectors.items()}
            return self._vectors
        with torch.inference_mode(False), torch.no_grad():
            w, d = self._layer_weights()
            m = self.magnitude.to(w.device)
            if self.kind == "peft":  # |W_i + s D_i|^2 = a + 2 s b + s^2 c, for any strength s
                v = {"m": m, "a": (w * w).sum(1), "b": (w * d).sum(1), "c": (d * d).sum(1)}
            elif self.out_axis:  # ComfyUI: per-row scale over the norms of the base weight
                v = {"r": m / (w.norm(dim=1) + _EPS)}
            else:  # per-column scale over the norms of the merged weight (full strength)
                v = {"c": m / ((w + d).norm(dim=0) + _EPS)}
            del w, d
            self._vectors = {k: t.to(device) for k, t in v.items()}
        return self._vectors

    def _row_factor(self, binding: Binding, device, dtype) -> Tensor:
        v = self.vectors(device)
        if self.kind == "peft":
            s = binding.strength  # peft: strength x alpha / r inside the norm (the delta holds alpha / r)
            r = v["m"] / torch.sqrt((v["a"] + 2 * s * v["b"] + s * s * v["c"]).clamp_min(0))
        else:
            r = v["r"]
        src = binding.src
        return (r if src is None else r[src[0]:src[1]]).to(dtype)

    def branch(self, binding: Binding, x: Tensor, base_out: Tensor) -> Tensor:
        s = binding.strength
        y0 = _features_of(base_out, binding.dst)
        if self.out_axis:
            r = self._row_factor(binding, x.device, x.dtype)
            if self.kind == "peft":  # diag(r) (W x + s D x) - W x
                return (r - 1) * y0 + r * (binding.delta(x) * s)
            return s * ((r - 1) * y0 + r * binding.delta(x))  # ComfyUI: W + s (diag(r)(W + D) - W)
        c = self.vectors(x.device)["c"].to(x.dtype)  # W + s ((W + D) diag(c) - W)
        module = binding.module
        w_part = module.forward(x * (c - 1))  # .forward: the base layer alone, not its hooks
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            w_part = w_part - bias.to(w_part.dtype)
        w_part = _features_of(w_part, binding.dst)
        return s * (w_part + binding.delta(x * c))

    def weight_delta(self, binding: Binding, w_rows: Tensor) -> Tensor:
        s = binding.strength
        d = binding.dense_delta().to(w_rows.device)
        if self.out_axis:
            r = self._row_factor(binding, w_rows.device, torch.float32)[:, None]
            if self.kind == "peft":
                return r * (w_rows + s * d) - w_rows
            return s * ((r - 1) * w_rows + r * d)
        c = self.vectors(w_rows.device)["c"][None, :]
        return s * ((w_rows + d) * c - w_rows)


def _model_label(model_name: str, width: int) -> str:
    return f"{model_name} (width {width})"


def _fit(model: nn.Module, adapter: LoraAdapter) -> list[tuple[str, nn.Module, tuple | None, tuple | None]]:
    """(module path, module, src rows, dst rows) for an adapter's target on this model; [] if absent."""
    path = adapter.target
    module = _get(model, path)
    if module is not None:
        return [(path, module, None, None)]
    head, _, tail = path.rpartition(".attn.")
    tail = "attn." + tail
    if tail in _SPLIT:  # fused q|k|v adapter, model with separate q, k, v
        parts = [(f"{head}.{name}", _get(model, f"{head}.{name}")) for name in _SPLIT[tail]]
        if all(m is not None for _, m in parts):
            n = [_features(m)[0] for _, m in parts]
            starts = [sum(n[:i]) for i in range(3)]
            return [(p, m, (s, s + k), None) for (p, m), s, k in zip(parts, starts, n)]
    if tail in _FUSED_OF:  # q, k or v adapter, model with the fused layer
        fused, i = _FUSED_OF[tail]
        module = _get(model, f"{head}.{fused}")
        if module is not None:
            rows = _features(module)[0] // 3
            return [(f"{head}.{fused}", module, None, (i * rows, (i + 1) * rows))]
    return []


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _missing(model: nn.Module, adapter: LoraAdapter, lora: LoraFile, model_name: str) -> Flux2KitError:
    target = adapter.target
    if "guidance_embedder" in target:
        return Flux2KitError(
            f"{lora.name} trains the guidance embedding ({adapter.source}), which only FLUX.2 [dev] has; the "
            f"transformer is {model_name}, which has none. This LoRA is for FLUX.2 [dev]: load [dev], or use a LoRA "
            f"made for {model_name}.")
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", target)
    if m:
        blocks = len(getattr(model, m.group(1)))
        kind = "double" if m.group(1) == "transformer_blocks" else "single"
        if int(m.group(2)) >= blocks:
            return Flux2KitError(
                f"{lora.name} has layer {adapter.source} ({kind} block {m.group(2)}), but the transformer "
                f"({model_name}) has {blocks} {kind} blocks: the LoRA was made for a deeper model "
                f"({lora.model_name}?). Use a LoRA made for {model_name}.")
    return Flux2KitError(f"{lora.name}: layer {adapter.source} has no place in the transformer ({model_name}; "
                         f"looked for {target}).")


def bind_lora(model: nn.Module, entry: LoraEntry, model_name: str = "the transformer") -> list[Binding]:
    """Fit every adapter of ``entry.lora`` onto ``model``; a clear error for any mismatch (nothing is changed)."""
    lora = entry.lora
    width = _width(model)
    if lora.width is not None and lora.width != width:
        raise Flux2KitError(
            f"{lora.name} is a LoRA for {_model_label(lora.model_name, lora.width)}, but the transformer is "
            f"{_model_label(model_name, width)}: their layers have different sizes. Load {lora.model_name} to use "
            f"this LoRA, or choose a LoRA made for {model_name}.")
    bindings: list[Binding] = []
    by_adapter: dict[int, list[Binding]] = {}
    for adapter in lora.adapters:
        fits = _fit(model, adapter)
        if not fits:
            raise _missing(model, adapter, lora, model_name)
        out, inp = adapter.shape
        total_out = sum((src[1] - src[0]) if src else (dst[1] - dst[0]) if dst else _features(m)[0]
                        for _, m, src, dst in fits)
        features = _features(fits[0][1])
        if features is None:
            raise Flux2KitError(f"{lora.name}: layer {adapter.source} targets {adapter.target}, which is not a "
                                "linear layer.")
        if (out, inp) != (total_out, features[1]):
            raise Flux2KitError(
                f"{lora.name}: layer {adapter.source} has shape {out}x{inp} (out x in) but the transformer's "
                f"{adapter.target} is {total_out}x{features[1]}: this LoRA does not fit {model_name} (wrong model, "
                "or a damaged file).")
        for path, module, src, dst in fits:
            if entry.strength_for(path) == 0.0:  # a block kind switched off by its factor: checked, not run
                continue
            b = Binding(adapter, path, module, src, dst, entry.strength_for(path))
            bindings.append(b)
            by_adapter.setdefault(id(adapter), []).append(b)
    for group in by_adapter.values():
        if group[0].adapter.dora is not None:
            state = DoraState(group[0].adapter, group)
            for b in group:
                b.dora = state
    return bindings


# ----------------------------------------------------------------------------------------------
# The LoRA'd transformer


_locks: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _lock_for(model: nn.Module) -> threading.RLock:
    """One lock per base model: two variants never run their hooks on it at the same time."""
    with _locks_guard:
        return _locks.setdefault(model, threading.RLock())


def _make_hook(bindings: list[Binding]):
    needs_base = any(b.dora is not None for b in bindings)

    def hook(module, args, output):
        x = args[0]
        base_out = output.clone() if needs_base else output
        out = output
        for b in bindings:
            out = b.add_to(x, base_out, out)
        return out

    return hook


class _Same:
    """A part of a cache key equal only to a key holding the same object (which it keeps alive meanwhile, so its
    id is not reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


@dataclass
class LoraTransformer:
    """A FLUX.2 transformer with a stack of LoRAs: the same base model, adapters active only while it runs.

    Everything the sampler reads (device, dtype, family, text width ...) comes from the base object,
    so there is one truth about where the shared weights are.
    """

    base: object  # the Flux2Transformer it adapts (never another LoraTransformer)
    stack: tuple[LoraEntry, ...]
    bindings: list[Binding] = field(default_factory=list, repr=False)
    patcher: object = None  # ComfyUI's ModelPatcher (a clone sharing the base's), set by the nodes

    def __post_init__(self):
        merging = [e for e in self.stack if e.active and e.merge]
        rounding = "stochastic" if any(e.rounding == "stochastic" for e in merging) else "nearest"
        self.merged = MergedWeights([b for b in self.bindings if b.merge], rounding=rounding)
        self._side: dict[str, list[Binding]] = {}
        for b in self.bindings:
            if not b.merge:
                self._side.setdefault(b.module_path, []).append(b)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("base", "bindings", "merged"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"LoraTransformer({self.base!r} + {', '.join(f'{e.lora.name} ({e.strength:g})' for e in self.stack)})"

    @property
    def device(self):
        return self.base.device

    @property
    def checkpoint(self) -> str:
        on = [f"{e.lora.name} at {e.strength:g}" for e in self.stack if e.active]
        return self.base.checkpoint + (f" + LoRA {', '.join(on)}" if on else "")

    @property
    def nbytes(self) -> int:
        """Memory this variant adds to the base: its adapters and, in merge mode, the merged weight copies."""
        seen, total = set(), 0
        for e in self.stack:
            if id(e.lora) not in seen:
                seen.add(id(e.lora))
                total += e.lora.nbytes
        return total + self.merged.planned_bytes(self.base.model)

    def __call__(self, *args, **kwargs):
        with self.active():
            return self.base(*args, **kwargs)

    def cache_key(self) -> tuple:
        """The base's key and this stack's active LoRAs (file, strength, factors, merge mode), so results computed
        from the weights (kept reference K/V) are never shared between variants of one base."""
        stack = tuple((_Same(e.lora), e.strength, e.double_blocks, e.single_blocks, e.merge, e.rounding)
                      for e in self.stack if e.active)
        stochastic = any(e.merge and e.rounding == "stochastic" for e in self.stack if e.active)
        return (self.base.cache_key(), stack, _Same(self.merged) if stochastic else None)  # random rounding: own

    @contextlib.contextmanager
    def active(self):
        """Install this stack on the shared base for the duration (hooks, merged weights), then remove it."""
        model = self.base.model
        with _lock_for(model):
            handles = []
            for b in self.bindings:
                if b.dora is not None and not b.merge:  # from the base weights, not merged copies
                    b.dora.vectors(b.module.weight.device)
            restore = self.merged.swap_in(model)
            try:
                for path, bindings in self._side.items():
                    handles.append(model.get_submodule(path).register_forward_hook(_make_hook(bindings)))
                yield self
            finally:
                for h in handles:
                    h.remove()
                restore()

    def to(self, device) -> "LoraTransformer":
        """Move the shared base (its own ``to``) and this variant's prepared tensors."""
        self.base.to(device)
        for b in self.bindings:
            b.release()
        self.merged.follow(self.base.model)
        return self

    def release(self) -> None:
        """Drop this variant's own tensors; the shared base stays loaded."""
        for b in self.bindings:
            b.release()
        self.merged.release()


def apply_loras(transformer, entries) -> LoraTransformer:
    """``transformer`` (a Flux2Transformer or a LoraTransformer) with ``entries`` added to its stack.

    Checks every LoRA against the model first (shapes, model size, blocks) and raises before
    anything is built; the base is never modified, so a failure leaves it as it was.
    """
    if isinstance(transformer, LoraTransformer):
        base, stack = transformer.base, transformer.stack
    else:
        base, stack = transformer, ()
    stack = stack + tuple(entries)
    if getattr(base, "model", None) is None:
        raise Flux2KitError("The transformer was released; run its loader again.")
    name = getattr(base, "name", "the transformer")
    bindings = []
    for entry in stack:
        if not entry.active:
            continue
        for b in bind_lora(base.model, entry, name):
            b.merge = entry.merge
            bindings.append(b)
    if any(b.merge for b in bindings):
        check_mergeable([b for b in bindings if b.merge])
    return LoraTransformer(base=base, stack=stack, bindings=bindings)



def check_loras_fit(config: dict, entries, model_name: str = "the transformer") -> None:
    """Check LoRAs against a transformer's config before loading it (a model on the meta device: no memory)."""
    if not any(e.active for e in entries):
        return
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    for entry in entries:
        if entry.active:
            bind_lora(model, entry, model_name)
