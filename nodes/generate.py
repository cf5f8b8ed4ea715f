"""Generate: the whole text/references-to-image run in one node, the local twin of the API node."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..pipelines.generate import check_prompt_or_images, check_text_encoder_fits, decode, sample, warn_reference_count
from ..pipelines.json_prompt import check_reference_mentions
from ..pipelines.references import encode_references, to_pil
from . import services
from .encode import encode_prompt, images_input, ordered_images
from .sampling import generation_inputs, resolve_size
from .types import CATEGORY, VAE, TextEncoder, Transformer


class Generate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitGenerate",
            display_name="FLUX.2 Generate (flux2kit)",
            category=CATEGORY,
            description="Prompt and up to 10 reference images in, images out, on the local model. Same inputs as "
                        "the FLUX.2 API node: swap this one node to move a workflow between local and hosted.",
            inputs=[
                Transformer.Input("transformer", tooltip="From FLUX.2 Load Transformer."),
                TextEncoder.Input("text_encoder", tooltip="From FLUX.2 Load Text Encoder."),
                VAE.Input("vae", tooltip="From FLUX.2 Load VAE."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Text or a JSON prompt. Name references by number ('the jacket from image 2'). "
                                        "Empty is allowed when references are connected."),
                images_input("Reference images 1-10, numbered in the order wired (batches count one per image)."),
                *generation_inputs(),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The generated images.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, transformer, text_encoder, vae, prompt, aspect_ratio, resolution, width, height,
                num_inference_steps, guidance, seed, batch_size, images=None) -> io.NodeOutput:
        flat = ordered_images(images)
        check_prompt_or_images(prompt, flat)
        check_reference_mentions(prompt, len(flat))  # 'image 5' with 2 references wired: a clear error
        w, h = resolve_size(aspect_ratio, resolution, width, height, to_pil(flat[0]).size if flat else None)
        check_text_encoder_fits(transformer, text_encoder.embed_dim, getattr(text_encoder, "family", None))
        warn_reference_count(len(flat), transformer.family)
        encoded = encode_prompt(text_encoder, prompt)
        references = None
        if flat:
            services.load_to_device(vae)
            with torch.inference_mode():
                references = encode_references(vae, flat)
        services.load_to_device(transformer)
        latents = sample(transformer, encoded.embeds, references, width=w, height=h,
                         num_inference_steps=num_inference_steps, guidance=guidance, seed=seed, batch_size=batch_size,
                         negative_embeds=encoded.negative,
                         callback=services.step_callback(num_inference_steps, transformer.device),
                         should_cancel=services.should_cancel)
        services.load_to_device(vae)
        return io.NodeOutput(decode(vae, latents))


NODES = [Generate]
