"""Sampler and decoder nodes. The sampler's LATENT is ComfyUI's FLUX.2 latent, so core VAE Decode works too."""

from __future__ import annotations

from comfy_api.latest import io

from ..pipelines import parameters as P
from ..pipelines.errors import Flux2KitError
from ..pipelines.generation.conditioning import SAME, sampler_conditioning
from ..pipelines.generation.editing import PASTE_KEY, edit_from_latent, latent_dict, paste_back, source_pixels
from ..pipelines.generation.generate import decode, sample
from ..pipelines.generation.reference_cache import estimate_bytes
from ..pipelines.generation.request import check_text_encoder_fits
from ..pipelines.prompting.json_prompt import check_reference_mentions
from . import services
from .editing import edit_inputs, reference_cache_input
from .types import CATEGORY, VAE, Conditioning, References, Transformer


def generation_inputs() -> list:
    """The inputs docs/parameters.md shares between the sampler, Generate and the API node (names are public)."""
    return [
        io.Combo.Input("aspect_ratio", options=list(P.ASPECT_RATIOS), default="1:1",
                       tooltip="Shape of the image. match_input_image uses the aspect of reference image 1."),
        io.Combo.Input("resolution", options=list(P.RESOLUTIONS), default="1 MP",
                       tooltip="Image area; 1 MP = 1024x1024 pixels. The model's maximum is 4 MP."),
        io.Int.Input("width", default=0, min=0, max=P.MAX_SIDE, step=P.SIZE_MULTIPLE,
                     tooltip="Exact width in pixels (multiple of 16). With height, overrides aspect_ratio and "
                             "resolution; 0 = unset."),
        io.Int.Input("height", default=0, min=0, max=P.MAX_SIDE, step=P.SIZE_MULTIPLE,
                     tooltip="Exact height in pixels (multiple of 16); 0 = unset. width x height at most 4 MP."),
        io.Int.Input("num_inference_steps", default=P.DEFAULTS["dev"]["num_inference_steps"], min=P.STEPS_RANGE[0],
                     max=P.STEPS_RANGE[1],
                     tooltip="Denoising steps. [dev]: 28 is a good trade-off, 50 the most detail. [klein] distilled: "
                             f"{P.DEFAULTS['klein-distilled']['num_inference_steps']}. [klein] base: "
                             f"{P.DEFAULTS['klein-base']['num_inference_steps']}."),
        io.Float.Input("guidance", default=P.DEFAULTS["dev"]["guidance"], min=P.GUIDANCE_RANGE[0],
                       max=P.GUIDANCE_RANGE[1], step=0.1, round=0.01,
                       tooltip="How closely to follow the prompt. [dev]: embedded guidance, 4.0 default; lower values "
                               "can look more natural. [klein] distilled: ignored. [klein] base: classifier-free "
                               "guidance scale against an empty prompt (4.0 usual; 1 or less turns it off, and above "
                               "1 each step runs the model twice)."),
        io.Int.Input("seed", default=0, min=0, max=P.MAX_SEED, control_after_generate=True,
                     tooltip="Noise seed. The same seed gives the same image on any device; image i of a batch "
                             "uses seed + i."),
        io.Int.Input("batch_size", default=1, min=P.BATCH_RANGE[0], max=P.BATCH_RANGE[1],
                     tooltip="Images per run; image i uses seed + i."),
    ]


def resolve_size(aspect_ratio, resolution, width, height, first_size):
    return P.resolve_size(aspect_ratio, resolution, width or None, height or None, first_size)


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitSampler",
            display_name="FLUX.2 Sampler (flux2kit)",
            category=CATEGORY,
            description="Flow-matching Euler sampling with FLUX.2's schedule, from noise or from a start LATENT "
                        "(image-to-image with denoise, inpainting with a mask). Shows progress with previews; "
                        "Cancel stops it at the next step. A start LATENT's size wins over the size inputs.",
            inputs=[
                Transformer.Input("transformer", tooltip="From FLUX.2 Load Transformer."),
                io.MultiType.Input("conditioning", types=[Conditioning, io.Conditioning],
                                   tooltip="From FLUX.2 Text Encode, or core CONDITIONING as core's FLUX.2 model takes "
                                           "it (any length, zero-padded to 512 tokens as core does) with its Reference "
                                           "Latent images and FluxGuidance value (3.5 when none is set, as in core)."),
                References.Input("references", optional=True,
                                 tooltip="Optional, from FLUX.2 Multi-Reference Encode: edit or combine these images."),
                *generation_inputs(),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional start: a FLUX.2 LATENT (FLUX.2 VAE Encode, core VAE Encode with the "
                                        "FLUX.2 VAE, core Set Latent Noise Mask, or an empty Flux 2 latent for the size "
                                        "only). Its size and batch win over width, height, aspect_ratio and "
                                        "resolution; its noise_mask makes it an inpaint."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional inpaint mask (white = repaint), any size with the image's aspect ratio; "
                                      "wins over the LATENT's noise_mask. Grow or feather it with core mask nodes."),
                *edit_inputs(),
                reference_cache_input(),
                io.MultiType.Input("negative", types=[Conditioning, io.Conditioning], optional=True,
                                   tooltip="Optional negative for FLUX.2 [klein] base's classifier-free guidance (scale "
                                           "= guidance, above 1): core CONDITIONING (with its own Reference Latents, as "
                                           "core samples it) or FLUX.2 Text Encode's. Without it, FLUX.2 Text Encode's "
                                           "conditioning guides against the empty prompt, and core conditioning runs "
                                           "without guidance (the node says so)."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT",
                                      tooltip="FLUX.2 latent (128 channels at 1/16). Decode with FLUX.2 Decode or "
                                              "ComfyUI's VAE Decode with flux2-vae.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, transformer, conditioning, aspect_ratio, resolution, width, height, num_inference_steps,
                guidance, seed, batch_size, references=None, latent=None, mask=None, denoise=1.0,
                source_as_reference=True, paste_back=True, mask_mode="binary", crop_margin=0,
                reference_cache="auto", negative=None) -> io.NodeOutput:
        cond = sampler_conditioning(transformer, conditioning, negative, guidance=guidance, references=references)
        refs, notes, edit = cond.references, list(cond.notes), None
        if latent is not None:
            edit, latent_notes = edit_from_latent(latent, denoise=denoise, mask=mask, mask_mode=mask_mode,
                                                  source_as_reference=source_as_reference, crop_margin=crop_margin)
            notes += latent_notes
            h, w = (16 * n for n in edit.latents.shape[-2:])
            notes.append(f"{w}x{h} from the LATENT")
        else:
            if mask is not None:
                raise Flux2KitError("A mask needs a start image: connect its LATENT (FLUX.2 VAE Encode) to latent.")
            if denoise < 1:
                raise Flux2KitError(f"denoise {denoise:g} needs a start image: connect a LATENT (FLUX.2 VAE Encode), "
                                    "or set denoise to 1.")
            w, h = resolve_size(aspect_ratio, resolution, width, height, refs.first_size if refs is not None else None)
        source = int(edit is not None and source_as_reference and not edit.empty_start)
        for prompt in cond.prompts:  # 'image 3' in the prompt with 2 references: say so before sampling
            if refs is not None or source:
                check_reference_mentions(prompt, (refs.count if refs is not None else 0) + source)
        check_text_encoder_fits(transformer, cond.embeds.shape[-1], getattr(conditioning, "family", None))
        ref_tokens = (refs.num_tokens if refs is not None else 0) + source * (w // 16) * (h // 16)
        services.load_to_device(transformer, memory_required=estimate_bytes(transformer, ref_tokens, reference_cache,
                                                                            batch_size))
        latents = sample(transformer, cond.embeds, refs, width=w, height=h,
                         num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                         batch_size=batch_size, negative_embeds=cond.negative_embeds, edit=edit,
                         negative_references=refs if cond.negative_references is SAME else cond.negative_references,
                         reference_cache=reference_cache, embedded_guidance=cond.embedded_guidance, notes=notes,
                         callback=services.step_callback(num_inference_steps, transformer.device),
                         should_cancel=services.should_cancel)
        out = latent_dict(latents, noise_mask=latent.get("noise_mask") if latent is not None else None)
        if edit is not None and edit.mask is not None and paste_back:
            pixels = source_pixels(latent, w, h)
            if pixels is None:
                notes.append("paste_back needs the start image's pixels: encode it with FLUX.2 VAE Encode (core VAE "
                             "Encode's LATENT has none), or decode as is")
            else:
                out[PASTE_KEY] = {"pixels": pixels, "mask": edit.mask, "mode": mask_mode}
        services.show_text(cls.hidden.unique_id if cls.hidden else None, "; ".join(notes))
        return io.NodeOutput(out)


class Decode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitDecode",
            display_name="FLUX.2 Decode (flux2kit)",
            category=CATEGORY,
            description="Decodes a FLUX.2 LATENT (from the sampler, or ComfyUI's FLUX.2 latents) into an IMAGE. After "
                        "an inpaint with paste_back, the start image's pixels outside the mask are put back exactly.",
            inputs=[
                VAE.Input("vae", tooltip="From FLUX.2 Load VAE."),
                io.Latent.Input("latent", tooltip="A FLUX.2 latent (128 channels)."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The decoded images.")],
        )

    @classmethod
    def execute(cls, vae, latent) -> io.NodeOutput:
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if samples is None:
            raise Flux2KitError("The latent input has no samples; connect the output of FLUX.2 Sampler.")
        services.load_to_device(vae)
        images = decode(vae, samples)
        paste = latent.get(PASTE_KEY)
        if isinstance(paste, dict) and tuple(paste["pixels"].shape[1:3]) == tuple(images.shape[1:3]):
            mask = paste["mask"].expand(images.shape[0], -1, -1) if paste["mask"].shape[0] == 1 else paste["mask"]
            images = paste_back(images, paste["pixels"], mask, paste["mode"])
        return io.NodeOutput(images)


NODES = [Sampler, Decode]
