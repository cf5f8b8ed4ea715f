"""HTTP routes the browser extension (web/) reads: facts that live in Python, served so they are written once."""

from __future__ import annotations

from . import api, loaders


def register(prompt_server) -> None:
    """Add flux2kit's routes to ComfyUI's server (``PromptServer.instance``); the frontend reaches them under /api too."""
    from aiohttp import web

    @prompt_server.routes.get("/flux2kit/api_models")
    async def api_models(request):  # noqa: ARG001 - aiohttp passes the request
        return web.json_response(api.browser_table())

    @prompt_server.routes.get("/flux2kit/missing_model")
    async def missing_model(request):
        """?node=Flux2KitTextEncoderLoader&value=FLUX.2-dev/ -> {"problem": text or null}: what the loader's own
        check says before a run (the frontend cannot check folders: they are not model file names)."""
        spec = loaders.MODEL_INPUTS.get(request.query.get("node", ""))
        if spec is None:
            return web.json_response({"error": "unknown node"}, status=400)
        _, folders, what = spec
        return web.json_response({"problem": loaders.missing_model(folders, request.query.get("value", ""), what)})
