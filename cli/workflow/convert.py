"""UI-format workflows (what ComfyUI's Save writes) to the API format, by the nodes' /object_info schemas."""

from __future__ import annotations

from ...pipelines.errors import Flux2KitError
from .graph import id_key
from .schema import CONTROL_VALUES, DYNAMIC_COMBO, VIRTUAL_NODES, WIDGET_TYPES, dynamic_children, input_specs, spec_options, spec_type

MODE_MUTED, MODE_BYPASSED = 2, 4


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
    for nid in sorted(nodes, key=lambda k: id_key(str(k))):
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
            specs = [(name, spec) for name, spec, _ in input_specs(info) if spec_type(spec) in WIDGET_TYPES]
            while specs and i < len(values):
                name, spec = specs.pop(0)
                inputs[name] = values[i]
                i += 1
                if spec_type(spec) == DYNAMIC_COMBO:  # the chosen option's widgets follow, named combo.child
                    specs[:0] = [(f"{name}.{child}", s) for child, s in dynamic_children(spec, inputs[name])]
                opts = spec_options(spec)
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
