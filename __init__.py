"""flux2kit: FLUX.2 for ComfyUI.

This folder is both a ComfyUI custom-node pack (cloned into ``ComfyUI/custom_nodes/``) and the
Python package ``flux2kit``. The engine in ``pipelines/`` never imports ComfyUI; the nodes are
loaded only when ComfyUI's API is importable, so ``import flux2kit`` works anywhere.
"""

__version__ = "0.1.0"

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI or a stand-in)
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"
