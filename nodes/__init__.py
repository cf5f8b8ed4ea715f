"""ComfyUI nodes: thin V3 declarations over ``pipelines/``. Imported only inside ComfyUI (or a stand-in)."""

from comfy_api.latest import ComfyExtension, io

from . import (api, editing, encode, example_inputs, generate, loaders, lora, prompts, quantize, sampling, save, services,
               upsample, web_routes)


def node_list() -> list[type[io.ComfyNode]]:
    return [*loaders.NODES, *lora.NODES, *encode.NODES, *editing.NODES, *sampling.NODES, *generate.NODES,
            *save.NODES, *quantize.NODES, *prompts.NODES, *upsample.NODES, *api.NODES]


class Flux2KitExtension(ComfyExtension):
    async def on_load(self) -> None:
        """Inside ComfyUI's server: the routes the browser extension reads, and the example images the shipped
        workflows load (copied into the input folder when missing)."""
        try:
            import folder_paths
            from server import PromptServer
        except ImportError:  # a stand-in without a server: nothing to serve, no input folder to fill
            return
        web_routes.register(PromptServer.instance)
        copied = example_inputs.install(folder_paths.get_input_directory())
        if copied:
            services.log.info("flux2kit: example images for the shipped workflows copied into the input folder: %s",
                              ", ".join(copied))

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


async def comfy_entrypoint() -> Flux2KitExtension:
    return Flux2KitExtension()
