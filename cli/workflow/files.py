"""Workflow files: the API format (what ComfyUI's Export (API) writes) and the UI format (what Save writes)."""

from __future__ import annotations

import json

from ...pipelines.errors import Flux2KitError


def read_workflow(path: str) -> tuple[dict, str]:
    """(data, "ui" or "api") from a JSON file: a UI workflow (ComfyUI's Save) or the API format.

    API workflows come back normalised ({str id: {class_type, inputs, ...}}); a POST /prompt body is unwrapped.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise Flux2KitError(f"Workflow not found: {path}.") from None
    except (OSError, ValueError) as e:
        raise Flux2KitError(f"{path} is not a JSON workflow: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        return data, "ui"
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # the body of a POST /prompt
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and "class_type" in n for n in data.values()):
        raise Flux2KitError(f"{path} is not an API-format workflow ({{node id: {{\"class_type\", \"inputs\"}}}}).")
    return {str(k): {**v, "inputs": dict(v.get("inputs") or {})} for k, v in data.items()}, "api"


def load_workflow(path: str) -> dict:
    """An API-format workflow ({node id: {class_type, inputs}}) from a JSON file; a UI file is refused with the fix."""
    data, kind = read_workflow(path)
    if kind == "ui":
        raise Flux2KitError(f"{path} is a UI workflow (what ComfyUI's Save writes). Run the API format instead: "
                            f"in ComfyUI use Workflow > Export (API), or take the twin in workflows/api/.")
    return data
