"""Node schemas as ComfyUI's /object_info describes them, and the one check of workflow values against them.

Used for every place a workflow is checked before it runs: the in-process runner, ``flux2kit batch``
(against each server's /object_info) and the UI-to-API conversion.
"""

from __future__ import annotations

from ...pipelines.errors import Flux2KitError
from ...pipelines.prompting.palette import parse_hex
from .graph import id_key, is_link

# Frontend-only node types: never sent to a server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "Label (rgthree)", "Fast Groups Bypasser (rgthree)"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COLOR", "COMFY_DYNAMICCOMBO_V3"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # a combo whose choice adds its own child widgets, named "combo.child"
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}


def input_specs(info: dict, key: str = "input"):
    """(name, spec, required) of a node's inputs in the order the UI shows its widgets."""
    declared = info.get(key) or {}
    order = info.get("input_order") or {k: list(v) for k, v in declared.items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = (declared.get(section) or {}).get(name)
            if spec is not None:
                yield name, spec, section == "required"


def dynamic_children(spec, choice) -> list:
    """(name, spec) of the child widgets a DynamicCombo's chosen option adds right after it."""
    option = next((o for o in spec_options(spec).get("options") or [] if o.get("key") == choice), None)
    return [(name, child) for name, child, _ in input_specs(option or {}, key="inputs")]


def spec_type(spec):
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(kind, list) else kind


def spec_options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_options(spec) -> list:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    return kind if isinstance(kind, list) else list(spec_options(spec).get("options") or [])


def is_image_input(info: dict, name: str) -> bool:
    """True for an input that takes a file from the input folder (LoadImage's image: ``image_upload``)."""
    for n, spec, _ in input_specs(info):
        if n == name:
            opts = spec_options(spec)
            return bool(opts.get("image_upload") or opts.get("upload") == "image")
    return False


def check_value(spec, value, *, check_options: bool = True) -> str | None:
    """ComfyUI's check of one widget value against its spec (/object_info or INPUT_TYPES); None when fine, else
    the problem. ``check_options=False`` leaves a combo's choice to the node (model files, images)."""
    kind, opts = spec_type(spec), spec_options(spec)
    if kind == "COMBO":
        options = combo_options(spec)
        if check_options and options and value not in options:
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
    elif kind == "COLOR":  # what the colour nodes accept, by their own parser
        if not isinstance(value, str):
            return f"must be a colour as #RRGGBB, got {value!r}"
        try:
            parse_hex(value)
        except Flux2KitError as e:
            return f"is not a colour: {e}"
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
    for nid in sorted(workflow, key=id_key):
        node = workflow[nid]
        info = object_info.get(node["class_type"])
        label = f"node #{nid} ({node['class_type']})"
        if info is None:
            problems.append(f"{label}: unknown node type (not installed where the batch runs)")
            continue
        specs = {name: (spec, required) for name, spec, required in input_specs(info)}
        combos = [name for name, (spec, _) in specs.items() if spec_type(spec) == DYNAMIC_COMBO]
        while combos:  # a DynamicCombo's chosen option adds its own inputs, named "combo.child"
            combo = combos.pop(0)
            option = next((o for o in spec_options(specs[combo][0]).get("options") or []
                           if o.get("key") == node["inputs"].get(combo)), None)
            for child, spec, required in input_specs(option or {}, key="inputs"):
                specs[f"{combo}.{child}"] = (spec, required)
                if spec_type(spec) == DYNAMIC_COMBO:
                    combos.append(f"{combo}.{child}")
        for name, (spec, required) in specs.items():
            if required and name not in node["inputs"] and spec_type(spec) not in ("COMFY_AUTOGROW_V3",):
                problems.append(f"{label}: required input {name!r} is missing")
        for name, value in node["inputs"].items():
            if name not in specs:
                if "." not in name and name != "upload":  # Autogrow slots ("images.image_1") are the node's
                    problems.append(f"{label}: no input named {name!r}; it has {', '.join(specs) or 'none'}")
                continue
            if is_link(value):
                if str(value[0]) not in workflow:
                    problems.append(f"{label}: input {name!r} is linked to node #{value[0]}, which is not in the workflow")
                continue
            if skip(nid, name):
                continue
            problem = check_value(specs[name][0], value)
            if problem:
                problems.append(f"{label}: input {name!r} {problem}")
    return problems


def spec_of(info: dict, name: str):
    """The /object_info spec of input ``name`` (required or optional), or None."""
    for section in ("required", "optional"):
        spec = ((info.get("input") or {}).get(section) or {}).get(name)
        if spec is not None:
            return spec
    return None


def input_names(info: dict) -> list[str]:
    return [n for section in ("required", "optional") for n in ((info.get("input") or {}).get(section) or {})]
