"""A workflow's graph (API format: {node id: {"class_type", "inputs"}}): links, node lookup, run order."""

from __future__ import annotations

import heapq

from ...pipelines.errors import Flux2KitError


class NodeError(Flux2KitError):
    """A problem with one node of the workflow; the message names the node id and its class."""

    def __init__(self, node_id: str, class_type: str, message: str):
        super().__init__(f"node #{node_id} ({class_type}): {message}")
        self.node_id, self.class_type = node_id, class_type


def is_link(value) -> bool:
    """A link input: [source node id, output slot]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], (str, int))


def id_key(nid: str):
    """Sort key for node ids: numbers in numeric order, then other ids."""
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def constant_inputs(workflow: dict, name: str):
    """(node id, inputs) of every node whose input ``name`` holds a value (not a link)."""
    return [(nid, n["inputs"]) for nid, n in workflow.items() if name in n["inputs"] and not is_link(n["inputs"][name])]


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


def needed_nodes(workflow: dict, outputs: list[str]) -> list[str]:
    """The nodes the outputs depend on, each after its inputs (lowest id first among the ready ones)."""
    needed, stack = set(), list(outputs)
    while stack:
        nid = stack.pop()
        if nid in needed:
            continue
        needed.add(nid)
        for name, value in workflow[nid]["inputs"].items():
            if is_link(value):
                if str(value[0]) not in workflow:
                    raise NodeError(nid, workflow[nid]["class_type"], f"input {name!r} is linked to node "
                                    f"#{value[0]}, which is not in the workflow.")
                stack.append(str(value[0]))
    inputs_of = {nid: {str(v[0]) for v in workflow[nid]["inputs"].values() if is_link(v)} for nid in needed}
    users = {nid: [n for n in needed if nid in inputs_of[n]] for nid in needed}
    waiting = {nid: len(inputs_of[nid]) for nid in needed}
    ready = [(id_key(nid), nid) for nid in needed if not waiting[nid]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, nid = heapq.heappop(ready)
        order.append(nid)
        for user in users[nid]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, (id_key(user), user))
    if len(order) < len(needed):
        stuck = sorted(needed - set(order), key=id_key)
        raise Flux2KitError(f"The workflow has a cycle through nodes #{', #'.join(stuck)}.")
    return order
