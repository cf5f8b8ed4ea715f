"""Workflows from outside ComfyUI: files, the graph, command-line changes, schema checks, UI-to-API conversion."""
