"""Every UI workflow in workflows/ (including ones added later) opens without nodes on top of each other.

Rectangles as ComfyUI's frontend draws them: a node's body at ``pos`` with ``size``, its title bar above
(LiteGraph's NODE_TITLE_HEIGHT, 30 px); a group's box is its ``bounding``, its title bar the top strip
(30 px in ComfyUI's frontend, font_size * 1.4 in older ones: the larger is taken). Checked: no two nodes
overlap, no node covers a group's title, and no node sticks out of a group (each is wholly inside or
wholly outside).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NODE_TITLE = 30
GAP = 0  # rectangles may touch, not overlap


def ui_files() -> list[Path]:
    """Every UI-format workflow under workflows/ (API-format files have no "nodes" list)."""
    found = []
    for path in sorted(WORKFLOWS.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("nodes"), list):
            found.append(path)
    return found


def graphs(data: dict):
    """(label, nodes, groups) of the workflow and of each subgraph it defines."""
    yield "graph", data["nodes"], data.get("groups", [])
    for sub in (data.get("definitions") or {}).get("subgraphs", []):
        yield f"subgraph {sub.get('name') or sub.get('id')}", sub.get("nodes", []), sub.get("groups", [])


def node_rect(node: dict):
    x, y = node["pos"][0], node["pos"][1]
    if (node.get("flags") or {}).get("collapsed"):
        w, h = 150, 0  # a collapsed node is its title bar
    else:
        w, h = node["size"][0], node["size"][1]
    return (x, y - NODE_TITLE, x + w, y + h)


def group_rects(group: dict):
    x, y, w, h = group["bounding"]
    title = max(NODE_TITLE, group.get("font_size", 24) * 1.4)
    return (x, y, x + w, y + h), (x, y, x + w, y + title)


def overlap(a, b) -> bool:
    return a[0] < b[2] - GAP and b[0] < a[2] - GAP and a[1] < b[3] - GAP and b[1] < a[3] - GAP


def inside(a, b) -> bool:
    return b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]


def label(node: dict) -> str:
    return f"#{node['id']} {node.get('title') or node['type']}"


def layout_problems(data: dict) -> list[str]:
    problems = []
    for where, nodes, groups in graphs(data):
        rects = [(label(n), node_rect(n)) for n in nodes]
        for i, (a, ra) in enumerate(rects):
            for b, rb in rects[i + 1:]:
                if overlap(ra, rb):
                    problems.append(f"{where}: {a} and {b} overlap")
        for g in groups:
            box, title = group_rects(g)
            for a, ra in rects:
                if overlap(ra, title):
                    problems.append(f"{where}: {a} covers the title of group {g.get('title')!r}")
                elif overlap(ra, box) and not inside(ra, box):
                    problems.append(f"{where}: {a} sticks out of group {g.get('title')!r}")
    return problems


def test_the_checks_find_what_issue_12_found():
    """The three overlaps found in a browser, rebuilt: the check reports each of them."""
    nodes = [{"id": 9, "type": "Flux2KitSaveImage", "pos": [1800, 0], "size": [520, 580]},
             {"id": 8, "type": "Flux2KitJSONText", "title": "Text: window sign", "pos": [1620, 580], "size": [360, 300]},
             {"id": 5, "type": "LoadImage", "title": "image 1", "pos": [400, 260], "size": [300, 314]}]
    groups = [{"title": "Prompt parts", "bounding": [380, -80, 1620, 1200], "font_size": 24},
              {"title": "Reference images 1-3", "bounding": [380, 230, 340, 1100], "font_size": 24}]
    found = layout_problems({"nodes": nodes, "groups": groups})
    assert "graph: #9 Flux2KitSaveImage and #8 Text: window sign overlap" in found
    assert "graph: #9 Flux2KitSaveImage sticks out of group 'Prompt parts'" in found
    assert "graph: #5 image 1 covers the title of group 'Reference images 1-3'" in found
    assert layout_problems({"nodes": nodes[1:2], "groups": groups[:1]}) == []


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: str(p.relative_to(WORKFLOWS)))
def test_nothing_overlaps(path):
    problems = layout_problems(json.loads(path.read_text(encoding="utf-8")))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_every_ui_workflow_is_checked():
    names = {p.name for p in ui_files()}
    assert {"json_prompt_palette.json", "three_reference_edit.json", "api_two_references.json"} <= names
