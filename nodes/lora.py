"""LoRA loader node: a FLUX.2 transformer + a LoRA file from ComfyUI's ``loras`` folder -> the same transformer with it.

Chain several to stack them. The output shares the loaded base model (no copy) and ComfyUI's memory
accounting (a patcher clone), and the file is read once: changing only a strength re-runs this node
(instantly: the parsed file is kept) and what comes after it, nothing before.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

from comfy_api.latest import io

from ..pipelines.files.lora_formats import LoraFile, read_lora, training_info
from ..pipelines.models.lora import LoraEntry, apply_loras
from . import services
from .types import CATEGORY, Transformer

log = logging.getLogger("flux2kit")

# Mode labels (saved in workflows: keep them) -> (merge, rounding).
MODES = {
    "side branch": (False, "nearest"),
    "merge": (True, "nearest"),
    "merge, stochastic rounding (as ComfyUI)": (True, "stochastic"),
}
_PARSED_FILES = 4  # parsed LoRA files kept, so that strength changes never read the file again
_parsed: OrderedDict[tuple, LoraFile] = OrderedDict()
_parsed_lock = threading.Lock()


def read_lora_cached(path: str) -> LoraFile:
    """The parsed file, read once per (path, size, modification time)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _parsed_lock:
        if key in _parsed:
            _parsed.move_to_end(key)
            return _parsed[key]
    lora = read_lora(path)
    with _parsed_lock:
        _parsed[key] = lora
        while len(_parsed) > _PARSED_FILES:
            _parsed.popitem(last=False)
    return lora


def lora_status(lora: LoraFile, entry: LoraEntry, mode: str) -> str:
    """What the node shows: what matched (in the file's own layer names), settings, training metadata, warnings."""
    lines = [f"{lora.name}: {lora.format}", lora.summary()]
    if not entry.enabled:
        lines.append("off (enabled is false): the transformer passes through unchanged")
    else:
        factors = ""
        if (entry.double_blocks, entry.single_blocks) != (1.0, 1.0):
            factors = f" (double blocks x{entry.double_blocks:g}, single blocks x{entry.single_blocks:g})"
        lines.append(f"strength {entry.strength:g}{factors}, {mode}")
    lines += [f"{label}: {value}" for label, value in training_info(lora.metadata).items()]
    lines += [f"warning: {w}" for w in lora.warnings()]
    return "\n".join(lines)


class LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitLoraLoader",
            display_name="FLUX.2 Load LoRA (flux2kit)",
            category=CATEGORY,
            description="Applies a FLUX.2 LoRA (ComfyUI/BFL, kohya, diffusers/PEFT, LyCORIS LoKr, DoRA; the format is "
                        "read from the file) to a transformer, as a side branch by default: the stored weights, FP8 or "
                        "not, are never changed or re-rounded. Chain several to stack them. Shows what matched and the "
                        "trigger words the file carries.",
            inputs=[
                Transformer.Input("transformer", tooltip="From FLUX.2 Load Transformer (or another FLUX.2 Load LoRA)."),
                io.Combo.Input("lora_name", options=services.list_files(services.LORA_FOLDERS),
                               tooltip="A .safetensors LoRA in models/loras, trained on FLUX.2 [dev] or [klein] 4B/9B "
                                       "(matching the transformer)."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA applies: 1 = as trained, 0 = off, negative = the "
                                       "opposite. Changing only this re-runs from here on; the file is not read again."),
                io.Boolean.Input("enabled", default=True, optional=True,
                                 tooltip="Switch this LoRA off without disconnecting it."),
                io.Float.Input("double_blocks", default=1.0, min=-10.0, max=10.0, step=0.05, optional=True,
                               tooltip="Factor on strength for the double-stream blocks (where image and text attend "
                                       "to each other); 1 = the same strength."),
                io.Float.Input("single_blocks", default=1.0, min=-10.0, max=10.0, step=0.05, optional=True,
                               tooltip="Factor on strength for the single-stream blocks (later, detail-level layers); "
                                       "1 = the same strength."),
                io.Combo.Input("mode", options=list(MODES), default="side branch", optional=True,
                               tooltip="side branch: the LoRA runs next to each layer; nothing is rounded again, "
                                       "switching or re-weighting costs nothing. merge: the LoRA is added into a "
                                       "copy of each changed weight (faster at high ranks, one weight copy more in "
                                       "memory; FP8 layers are re-quantized, rounding to nearest). merge, stochastic "
                                       "rounding: FP8 re-quantized as ComfyUI does (measured noisier; for comparison)."),
            ],
            outputs=[Transformer.Output(display_name="transformer",
                                        tooltip="The same transformer with this LoRA (the base weights are shared).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, transformer=None, lora_name=None, **_):
        return services.file_fingerprint(services.LORA_FOLDERS, lora_name)

    @classmethod
    def execute(cls, transformer, lora_name, strength, enabled=True, double_blocks=1.0, single_blocks=1.0,
                mode="side branch") -> io.NodeOutput:
        path = services.resolve_model(services.LORA_FOLDERS, lora_name)
        lora = read_lora_cached(path)
        merge, rounding = MODES.get(mode, MODES["side branch"])
        entry = LoraEntry(lora, strength=float(strength), enabled=bool(enabled), double_blocks=float(double_blocks),
                          single_blocks=float(single_blocks), merge=merge, rounding=rounding)
        adapted = apply_loras(transformer, [entry])  # checks everything before building anything
        base_patcher = getattr(adapted.base, "patcher", None)
        if base_patcher is not None:
            services.attach_patcher(adapted, adapted.base.model, size=base_patcher.model_size() + adapted.nbytes,
                                    clone_of=base_patcher)
        status = lora_status(lora, entry, mode)
        for warning in lora.warnings():
            log.warning("%s: %s", lora.name, warning)
        services.show_text(cls.hidden.unique_id if cls.hidden else None, status)
        return io.NodeOutput(adapted)


NODES = [LoraLoader]
