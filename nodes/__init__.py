"""ComfyUI nodes: thin V3 declarations over ``pipelines/``. Imported only inside ComfyUI (or a stand-in)."""

from comfy_api.latest import ComfyExtension, io

from . import api, encode, generate, loaders, lora, prompts, quantize, sampling, save


def node_list() -> list[type[io.ComfyNode]]:
    return [*loaders.NODES, *lora.NODES, *encode.NODES, *sampling.NODES, *generate.NODES, *save.NODES, *quantize.NODES,
            *prompts.NODES, *api.NODES]


class Flux2KitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


async def comfy_entrypoint() -> Flux2KitExtension:
    return Flux2KitExtension()
