"""Generate: the whole text/references-to-image run in one node, the local twin of the API node."""

from __future__ import annotations

from comfy_api.latest import io

from ..pipelines.generation.generate import generate
from ..pipelines.generation.request import GenerationRequest
from . import services
from .editing import CROP_NOTE, edit_inputs, reference_cache_input
from .encode import encode_prompt, images_input, ordered_images
from .sampling import generation_inputs
from .types import CATEGORY, VAE, TextEncoder, Transformer


class Generate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitGenerate",
            display_name="FLUX.2 Generate (flux2kit)",
            category=CATEGORY,
            description="Prompt and up to 10 reference images in, images out, on the local model. Same inputs as "
                        "the FLUX.2 API node: swap this one node to move a workflow between local and hosted. "
                        "Local only: a start image with denoise (image-to-image) and a mask (inpaint, outpaint).",
            inputs=[
                Transformer.Input("transformer", tooltip="From FLUX.2 Load Transformer."),
                TextEncoder.Input("text_encoder", tooltip="From FLUX.2 Load Text Encoder."),
                VAE.Input("vae", tooltip="From FLUX.2 Load VAE."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Text or a JSON prompt. Name references by number ('the jacket from image 2'). "
                                        "Empty is allowed when references are connected."),
                images_input("Reference images 1-10, numbered in the order wired (batches count one per image)."),
                *generation_inputs(),
                io.Image.Input("start_image", optional=True,
                               tooltip="Optional image to edit (image-to-image, inpaint, outpaint); its size wins over "
                                       "width, height, aspect_ratio and resolution. At most 4 MP, never resized. "
                                       + CROP_NOTE),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional inpaint mask for the start image (white = repaint), any size with its "
                                      "aspect ratio. Grow, feather or pad it with core mask nodes."),
                *edit_inputs(),
                reference_cache_input(),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The generated images.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, transformer, text_encoder, vae, prompt, aspect_ratio, resolution, width, height,
                num_inference_steps, guidance, seed, batch_size, images=None, start_image=None, mask=None,
                denoise=1.0, source_as_reference=True, paste_back=True, mask_mode="binary",
                crop_margin=0, reference_cache="auto") -> io.NodeOutput:
        job = GenerationRequest(prompt=prompt, images=tuple(ordered_images(images)), aspect_ratio=aspect_ratio,
                                resolution=resolution, width=width, height=height,
                                num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                                batch_size=batch_size, start_image=start_image, mask=mask, denoise=denoise,
                                source_as_reference=source_as_reference, paste_back=paste_back, mask_mode=mask_mode,
                                crop_margin=crop_margin, reference_cache=reference_cache).check()
        job.check_models(transformer, text_encoder)  # before the prompt is encoded
        notes = []
        pixels = generate(transformer, text_encoder, vae, job, encode=lambda text: encode_prompt(text_encoder, text),
                          prepare=services.load_to_device,
                          callback=services.step_callback(num_inference_steps, transformer.device),
                          should_cancel=services.should_cancel, notes=notes)
        services.show_text(cls.hidden.unique_id if cls.hidden else None, "; ".join(notes))
        return io.NodeOutput(pixels)


NODES = [Generate]
