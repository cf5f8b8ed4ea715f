"""ComfyUI nodes: thin V3 declarations over ``pipelines/``. Imported only inside ComfyUI."""

from comfy_api.latest import ComfyExtension, io


class Flux2KitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> Flux2KitExtension:
    return Flux2KitExtension()
