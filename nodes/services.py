"""ComfyUI services the nodes use: model folders, memory accounting, progress with previews, Cancel.

Everything ComfyUI-specific that is not a node declaration lives here, so the node files stay
declarations plus one call into ``pipelines/``.
"""

from __future__ import annotations

import logging
import os

import torch

import folder_paths

log = logging.getLogger("flux2kit")

# Folder names (ComfyUI's own) a loader lists files from; diffusers folders come from "diffusers" too.
TRANSFORMER_FOLDERS = ("diffusion_models",)
TEXT_ENCODER_FOLDERS = ("text_encoders",)
VAE_FOLDERS = ("vae",)
LORA_FOLDERS = ("loras",)
_WEIGHT_EXTENSIONS = (".safetensors", ".sft")
# GGUF files are listed through folder keys of the pack's own, holding the core folders' own path lists:
# adding ".gguf" to core's keys would make core's loaders offer files they cannot read.
GGUF_FOLDER_KEYS = {"diffusion_models": "flux2kit_gguf_unet", "text_encoders": "flux2kit_gguf_clip"}


# -- model files ---------------------------------------------------------------------------------

def _roots(name: str) -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(name))
    except (KeyError, AttributeError):
        return []


def _model_folders(root: str, marker: str | None) -> list[str]:
    """Sub-folders of ``root`` holding a Hugging Face / diffusers model (a config.json, or ``marker``)."""
    found = []
    if not os.path.isdir(root):
        return found
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        names = set(filenames)
        if "config.json" in names or "model_index.json" in names or (marker and os.path.isdir(os.path.join(dirpath, marker))):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            if rel != ".":
                found.append(rel + "/")
            dirnames[:] = []  # a model folder's sub-folders are its components, not other models
    return found


def gguf_folder_key(name: str) -> str | None:
    """The pack's folder key listing ``.gguf`` files in ComfyUI's folder ``name`` (registered on first use).

    The key shares the core folder's own list of paths (as ComfyUI-GGUF's keys do), so paths added later
    (extra_model_paths.yaml, ``models/unet`` next to ``models/diffusion_models``) are searched too; it is
    registered again whenever the core folder's list object was replaced.
    """
    key = GGUF_FOLDER_KEYS.get(name)
    table = getattr(folder_paths, "folder_names_and_paths", None)
    if key is None or table is None or name not in table:
        return None
    paths = table[name][0]
    if key not in table or table[key][0] is not paths:
        table[key] = (paths, {".gguf"})
    return key


for _core_name in GGUF_FOLDER_KEYS:  # registered when the pack loads, as ComfyUI-GGUF registers its own
    gguf_folder_key(_core_name)


def list_models(folders: tuple[str, ...], *, component: str, files: bool = True) -> list[str]:
    """Choices for a loader: weight files (safetensors, and GGUF through the pack's own folder keys) in
    ComfyUI's ``folders``, and model folders (trailing ``/``).

    Folders come from the same roots and from ComfyUI's ``diffusers`` folder (pipeline folders that
    contain ``component``, e.g. ``transformer``).
    """
    out: list[str] = []
    for name in folders:
        if files:
            try:
                out += [f for f in folder_paths.get_filename_list(name) if f.lower().endswith(_WEIGHT_EXTENSIONS)]
            except (KeyError, AttributeError):
                pass
            key = gguf_folder_key(name)
            if key is not None:
                try:
                    out += [f for f in folder_paths.get_filename_list(key) if f.lower().endswith(".gguf")]
                except (KeyError, AttributeError):
                    pass
        for root in _roots(name):
            out += _model_folders(root, component)
    for root in _roots("diffusers"):
        out += [f for f in _model_folders(root, component) if os.path.isdir(os.path.join(root, f, component))]
    return sorted(dict.fromkeys(out))


def list_files(folders: tuple[str, ...]) -> list[str]:
    """Every file ComfyUI lists in ``folders`` (pickles too, so that choosing one gets a clear refusal)."""
    out: list[str] = []
    for name in folders:
        try:
            out += list(folder_paths.get_filename_list(name))
        except (KeyError, AttributeError):
            pass
    return sorted(dict.fromkeys(out))


def file_fingerprint(folders: tuple[str, ...], choice: str):
    """Changes when the file (or a folder's newest file) changes on disk under the same name: reload then."""
    try:
        path = resolve_model(folders, choice)
        if os.path.isdir(path):
            return max((os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs), default=0)
        st = os.stat(path)
        return (st.st_size, st.st_mtime_ns)
    except Exception:  # missing: the loader itself reports it
        return None


def model_roots(folders: tuple[str, ...]) -> list[str]:
    """The folders a loader looks in, in order: ComfyUI's ``folders``, then its diffusers folders."""
    return [r for name in folders + ("diffusers",) for r in _roots(name)]


def resolve_model(folders: tuple[str, ...], choice: str) -> str:
    """The full path of a loader choice; an error that says where it was looked for."""
    from ..pipelines.errors import Flux2KitError

    if os.path.isabs(choice) and os.path.exists(choice):
        return choice
    roots = model_roots(folders)
    for root in roots:
        path = os.path.join(root, choice.rstrip("/"))
        if os.path.exists(path):
            return path
    where = ", ".join(roots) or "ComfyUI's models folders"
    raise Flux2KitError(f"Model not found: {choice!r}. Put it in one of: {where}; then press R to refresh the list.")


# -- memory --------------------------------------------------------------------------------------

def _model_management():
    try:
        import comfy.model_management as mm
    except Exception:  # a stand-in without it: nothing to account
        return None
    return mm


def compute_device() -> torch.device:
    mm = _model_management()
    if mm is not None:
        try:
            return torch.device(mm.get_torch_device())
        except Exception:
            pass
    from ..pipelines.devices import default_device

    return default_device()


def offload_device() -> torch.device:
    mm = _model_management()
    if mm is not None and hasattr(mm, "unet_offload_device"):
        return torch.device(mm.unet_offload_device())
    return torch.device("cpu")


def attach_patcher(engine_object, module: torch.nn.Module, *, size: int | None = None, clone_of=None) -> None:
    """Register an engine model with ComfyUI's memory accounting (``engine_object.patcher``).

    ComfyUI can then move it off the GPU when another model needs the memory, and "Free model and
    node cache" (/free) unloads it. The patcher moves the whole model at once (never split across
    devices); the engine object's own ``to`` keeps its device bookkeeping right.

    ``clone_of``: a patcher whose model this object shares (a LoRA'd variant of a loaded base). The new
    patcher holds the same model object, as core's ``ModelPatcher.clone`` does, so ComfyUI counts the
    base once (``is_clone``) and unloads one variant's bookkeeping when another loads.
    """
    engine_object.patcher = None
    try:
        import comfy.model_patcher as cmp
    except Exception:
        return
    mm = _model_management()
    if mm is None or not hasattr(cmp.ModelPatcher, "detach"):
        return  # a stand-in without ComfyUI's loading protocol

    def _init(self, inner):
        torch.nn.Module.__init__(self)
        self.inner = inner

    # ModelPatcher writes module.device, and diffusers modules have a read-only one, so the module
    # sits in a holder; its class name is what ComfyUI's log shows ("Requested to load Flux2KitVAE").
    _Holder = type(f"Flux2Kit{type(engine_object).__name__.removeprefix('Flux2')}", (torch.nn.Module,),
                   {"__init__": _init})

    class Flux2KitPatcher(cmp.ModelPatcher):
        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            device_to = torch.device(device_to or self.load_device)
            engine_object.to(device_to)
            self.model.device = device_to
            self.model.model_loaded_weight_memory = 0 if device_to.type == "cpu" else self.model_size()

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            self.load(device_to)
            return self.model_size()

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return 0  # all or nothing: ComfyUI then detaches the whole model

        def detach(self, unpatch_all=True):
            self.eject_model()
            if unpatch_all:
                engine_object.to(self.offload_device)
                self.model.device = self.offload_device
                self.model.model_loaded_weight_memory = 0
            return self.model

    if size is None:
        size = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    if clone_of is not None:
        holder = clone_of.model
    else:
        holder = _Holder(module)
        holder.device = getattr(engine_object, "device", torch.device("cpu"))
    engine_object.patcher = Flux2KitPatcher(holder, load_device=compute_device(), offload_device=offload_device(),
                                            size=size)
    if clone_of is not None:
        engine_object.patcher.parent = clone_of  # like ModelPatcher.clone: ComfyUI falls back to the base


def load_to_device(*engine_objects, memory_required: int = 0) -> None:
    """Ask ComfyUI to make room and put these models on the compute device (evicting others if needed)."""
    mm = _model_management()
    patchers = [o.patcher for o in engine_objects if getattr(o, "patcher", None) is not None]
    if mm is not None and patchers:
        mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)
        return
    device = compute_device()
    for o in engine_objects:
        if getattr(o, "device", device) != device and hasattr(o, "to"):
            o.to(device)


# -- progress, previews, Cancel ------------------------------------------------------------------

def raise_if_cancelled() -> None:
    """ComfyUI's Cancel: raises its interrupt exception when the user pressed Cancel."""
    mm = _model_management()
    if mm is not None and hasattr(mm, "throw_exception_if_processing_interrupted"):
        mm.throw_exception_if_processing_interrupted()


def should_cancel() -> bool:
    raise_if_cancelled()
    return False


def _previewer(device):
    try:
        import comfy.latent_formats
        import latent_preview
    except Exception:
        return None
    fmt = comfy.latent_formats.Flux2()
    if not getattr(fmt, "latent_rgb_factors", None) and not getattr(fmt, "taesd_decoder_name", None):
        return None
    try:
        return latent_preview.get_previewer(device, fmt)
    except Exception:
        return None


def step_callback(total: int, device=None):
    """A per-step callback for ``pipelines`` stages: ComfyUI's progress bar with latent previews."""
    try:
        import comfy.utils

        bar = comfy.utils.ProgressBar(total)
    except Exception:
        bar = None
    previewer = _previewer(device or compute_device())

    def callback(step: int, total_steps: int, denoised: torch.Tensor) -> None:
        raise_if_cancelled()
        if bar is None:
            return
        preview = None
        if previewer is not None:
            try:
                preview = previewer.decode_latent_to_preview_image("JPEG", denoised)
            except Exception:  # a preview must never break sampling
                preview = None
        bar.update_absolute(step, total_steps, preview)

    return callback


def token_progress(total: int):
    """A per-token callback for text generation: ComfyUI's progress bar, and Cancel."""
    try:
        import comfy.utils

        bar = comfy.utils.ProgressBar(total)
    except Exception:
        bar = None

    def callback(step: int, total_steps: int) -> None:
        raise_if_cancelled()
        if bar is not None:
            bar.update_absolute(step, total_steps)

    return callback


def show_text(node_id, text: str) -> None:
    """Status text on the node in the browser (ComfyUI's progress-text channel)."""
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:
        pass
