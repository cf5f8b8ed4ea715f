"""Command-line changes to a workflow: --prompt, --seed, --size, --steps, --set NODE.INPUT=VALUE, --image."""

from __future__ import annotations

import copy
import json
import os

from ...pipelines.errors import Flux2KitError
from .graph import constant_inputs, find_node, id_key, is_link


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


def apply_overrides(workflow: dict, *, prompt: str | None = None, seed: int | None = None,
                    size: tuple[int, int] | None = None, steps: int | None = None, settings=(), images=()) -> dict:
    """A copy of ``workflow`` with the command line's changes.

    ``prompt``, ``seed``, ``size`` and ``steps`` go to every node that has that input (``size`` to
    width and height); ``settings`` are ``"NODE.INPUT=VALUE"`` (NODE an id, title or class type);
    ``images`` are ``"NODE=PATH"`` or bare paths, which fill the LoadImage nodes in id order.
    """
    wf = copy.deepcopy(workflow)

    def set_all(name, value, what):
        targets = constant_inputs(wf, name)
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
                and not any(is_link(n["inputs"][k]) for k in ("width", "height"))]
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
        if is_link(current):
            raise Flux2KitError(f"--set {setting!r}: input {name!r} of node #{nid} is connected to node #{current[0]}.")
        try:
            wf[nid]["inputs"][name] = parse_value(text, current)
        except Flux2KitError as e:
            raise Flux2KitError(f"--set {setting!r}: {e}") from None
    load_nodes = sorted((nid for nid, n in wf.items() if n["class_type"] == "LoadImage"), key=id_key)
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
