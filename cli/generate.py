"""``flux2kit generate`` (the real FLUX.2 files) and ``flux2kit demo`` (tiny random models): prompt in, PNGs out.

Both build the same :class:`GenerationRequest` as the Generate node and check it before anything
loads; then the text encoder encodes the prompt and is freed before the transformer loads (the real
24B encoder and 32B transformer do not fit in memory together), and ``generate()`` does the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from .. import __version__
from ..pipelines.errors import Flux2KitError
from ..pipelines.generation.request import GenerationRequest
from ..pipelines.parameters import ASPECT_RATIOS, DEFAULTS, KLEIN_MODES, RESOLUTIONS
from .arguments import parse_resolution, parse_size
from .terminal import CtrlC, Progress, say, timed

PNG_KEY = "parameters"


def add_demo_arguments(demo) -> None:
    from ..pipelines.demo_models import DEMO_PROMPT, DEMO_SIZE, DEMO_STEPS

    add = demo.add_argument
    add("--models", default="./demo-models", metavar="DIR", help="folder for the tiny models (default: ./demo-models)")
    add("--out", default="./output", metavar="DIR", help="folder for the PNG (default: ./output)")
    add("--prompt", default=DEMO_PROMPT, metavar="TEXT", help="the prompt")
    add("--seed", type=int, default=0, metavar="N", help="noise seed (default: 0)")
    add("--steps", type=int, default=DEMO_STEPS, metavar="N", help=f"sampling steps (default: {DEMO_STEPS})")
    add("--size", type=parse_size, default=DEMO_SIZE, metavar="WxH",
        help=f"image size (default: {DEMO_SIZE[0]}x{DEMO_SIZE[1]})")


def add_generate_arguments(gen) -> None:
    dev = DEFAULTS["dev"]
    add = gen.add_argument
    add("--transformer", required=True, metavar="PATH", help="transformer file (safetensors or GGUF) or diffusers folder")
    add("--text-encoder", required=True, metavar="PATH",
        help="text encoder: a Hugging Face folder, a ComfyUI single file or a llama.cpp GGUF (Mistral-Small-3 for "
             "[dev], Qwen3 for [klein])")
    add("--tokenizer", metavar="DIR", help="tokenizer folder for a single-file text encoder that carries none (ComfyUI's "
                                           "Qwen3 files, GGUFs without a vocabulary)")
    add("--vae", required=True, metavar="PATH", help="VAE file (flux2-vae.safetensors) or diffusers folder")
    add("--prompt", default="", metavar="TEXT", help="text or a JSON prompt (may be empty when --image is given)")
    add("--image", dest="images", action="extend", nargs="+", default=[], metavar="PATH",
        help="reference image(s), numbered 1..N in the order given (up to 10)")
    add("--start-image", metavar="PATH",
        help="edit this image (image-to-image / inpaint); its size wins over the size options. A PNG with "
             "transparency: the transparent area is the mask, as in ComfyUI's Load Image")
    add("--mask", metavar="PATH", help="inpaint mask for --start-image: white = repaint (any size of its aspect)")
    add("--denoise", type=float, default=1.0, metavar="D",
        help="with --start-image: 0-1, how much is repainted (ComfyUI KSampler's meaning; default: 1)")
    add("--crop-margin", type=int, default=0, metavar="PX",
        help="with --mask: sample only the mask's box plus this many pixels, then stitch (default: 0 = whole image)")
    add("--aspect-ratio", choices=ASPECT_RATIOS, default="1:1", help="default: 1:1")
    add("--resolution", type=parse_resolution, default="1 MP", metavar="MP",
        help=f"one of {', '.join(RESOLUTIONS)} (\"1MP\" or \"1\" also work; default: 1 MP)")
    add("--width", type=int, metavar="N", help="exact width, a multiple of 16 (with --height; overrides the ratio)")
    add("--height", type=int, metavar="N", help="exact height, a multiple of 16 (with --width)")
    add("--steps", "--num-inference-steps", dest="steps", type=int, metavar="N",
        help=f"sampling steps, 1-50 (default: the model's: [dev] {dev['num_inference_steps']}, "
             f"[klein] distilled {DEFAULTS['klein-distilled']['num_inference_steps']}, "
             f"base {DEFAULTS['klein-base']['num_inference_steps']})")
    add("--guidance", type=float, metavar="G",
        help=f"0-10: [dev] embedded guidance (default {dev['guidance']}); [klein] base: classifier-free guidance "
             f"scale (default {DEFAULTS['klein-base']['guidance']}); ignored by [klein] distilled")
    add("--klein-mode", choices=KLEIN_MODES, default="auto",
        help="[klein] only: distilled or base (identical tensors; auto reads the file's metadata and asks when "
             "it says nothing), or kv for FLUX.2 [klein] 9B KV (references cached)")
    add("--seed", type=int, default=0, metavar="N", help="noise seed; image i of a batch uses seed + i (default: 0)")
    add("--batch-size", type=int, default=1, metavar="N", help="images to make, 1-16 (default: 1)")
    add("--out", default="./output", metavar="DIR", help="folder for the PNGs (default: ./output)")
    add("--device", default="auto", metavar="DEVICE", help="auto (CUDA if there, else CPU), cpu, cuda, cuda:N or mps")
    add("--text-encoder-device", metavar="DEVICE", help="where to run the text encoder (default: --device)")
    add("--offload-blocks", action="store_true",
        help="keep transformer blocks in RAM and move each to the GPU only while it runs")
    add("--lora", dest="loras", action=LoraFileAction, default=[], metavar="FILE",
        help="a FLUX.2 LoRA (.safetensors: ComfyUI/BFL, kohya, diffusers/PEFT, LoKr, DoRA); repeat to stack them")
    add("--lora-strength", dest="loras", action=LoraStrengthAction, type=float, metavar="X",
        help="strength of the --lora just before it (default 1; negative allowed)")
    add("--lora-merge", action="store_true",
        help="merge the LoRAs into copies of the weights they change (faster at high ranks, more memory) "
             "instead of running them as a side branch; not for GGUF transformers (side branch only)")

    up = gen.add_argument_group("prompt upsampling", "rewrite the prompt with FLUX.2 [dev]'s own text encoder first "
                                "(the whole model: its Hugging Face folder, 48 GB in bf16); the references are shown to it")
    up.add_argument("--upsample", action="store_true",
                    help="upsample the prompt before encoding it (seeded by --seed; printed and saved in the PNGs)")
    up.add_argument("--upsample-temperature", type=float, default=0.15, metavar="T",
                    help="sampling temperature, 0-2 (default: 0.15, as diffusers and BFL; 0 = most likely words)")
    up.add_argument("--upsample-max-new-tokens", type=int, default=512, metavar="N",
                    help="at most N new tokens, 1-2048 (default: 512)")
    up.add_argument("--upsample-text-encoder", metavar="PATH",
                    help="the Mistral text encoder folder to upsample with (default: --text-encoder; [klein] needs "
                         "FLUX.2 [dev]'s, as BFL's reference code does)")


class LoraFileAction(argparse.Action):
    """``--lora FILE``: a new LoRA of the stack, strength 1 until a ``--lora-strength`` follows."""

    def __call__(self, parser, namespace, value, option_string=None):
        loras = list(getattr(namespace, self.dest, None) or [])
        loras.append({"file": value, "strength": None})
        setattr(namespace, self.dest, loras)


class LoraStrengthAction(argparse.Action):
    """``--lora-strength X``: the strength of the ``--lora`` given just before (pairs, in order)."""

    def __call__(self, parser, namespace, value, option_string=None):
        loras = list(getattr(namespace, self.dest, None) or [])
        if not loras or loras[-1]["strength"] is not None:
            parser.error("--lora-strength X goes right after the --lora FILE it applies to "
                         "(e.g. --lora a.safetensors --lora-strength 0.8 --lora b.safetensors --lora-strength -0.5)")
        loras[-1] = {**loras[-1], "strength": value}
        setattr(namespace, self.dest, loras)


def run_demo(args) -> None:
    from ..pipelines.demo_models import build_demo_models, demo_models_ready

    folder = os.path.abspath(args.models)
    if demo_models_ready(folder):
        say(f"Using the tiny demo models in {folder}.")
    else:
        say(f"Building tiny demo models in {folder} (once; about 25 MB, a few seconds)...")
    paths = build_demo_models(folder)
    say("The demo models have RANDOM weights: the image will look like coloured noise, not a picture. "
        "It shows that flux2kit runs; use `flux2kit generate` with the FLUX.2 [dev] files for real images.")
    width, height = args.size
    params = dict(prompt=args.prompt, width=width, height=height, num_inference_steps=args.steps,
                  guidance=DEFAULTS["dev"]["guidance"], seed=args.seed, batch_size=1)
    saved = generate_files(paths, params, [], out_dir=args.out, device="cpu", text_encoder_device="cpu",
                           offload_blocks=False, prefix="flux2kit_demo")
    print(saved[-1])


def run_generate(args) -> None:
    paths = {"transformer": args.transformer, "text_encoder": args.text_encoder, "vae": args.vae}
    params = dict(prompt=args.prompt, aspect_ratio=args.aspect_ratio, resolution=args.resolution, width=args.width,
                  height=args.height, num_inference_steps=args.steps, guidance=args.guidance, seed=args.seed,
                  batch_size=args.batch_size, denoise=args.denoise, crop_margin=args.crop_margin)
    if args.start_image:
        params.update(start_image_mask(args.start_image, args.mask))
    elif args.mask:
        raise Flux2KitError("--mask needs --start-image: the image the mask belongs to.")
    upsample = None
    if args.upsample:
        upsample = {"temperature": args.upsample_temperature, "max_new_tokens": args.upsample_max_new_tokens,
                    "text_encoder": args.upsample_text_encoder}
    saved = generate_files(paths, params, args.images, out_dir=args.out, device=args.device,
                           text_encoder_device=args.text_encoder_device, offload_blocks=args.offload_blocks,
                           prefix="flux2kit", klein_mode=args.klein_mode, tokenizer=args.tokenizer, upsample=upsample,
                           loras=args.loras, lora_merge=args.lora_merge,
                           edit_paths={"start_image": args.start_image, "mask": args.mask})
    for path in saved:
        print(path)


def generate_files(paths: dict, params: dict, image_paths: list[str], *, out_dir: str, device, text_encoder_device,
                   offload_blocks: bool, prefix: str, klein_mode: str = "auto", tokenizer: str | None = None,
                   upsample: dict | None = None, loras=(), lora_merge: bool = False,
                   edit_paths: dict | None = None) -> list[str]:
    """Make the images and save them as PNGs; returns their absolute paths.

    ``upsample``: ``{"temperature", "max_new_tokens", "text_encoder"}`` to rewrite the prompt first (seeded by
    the noise seed) with the whole FLUX.2 [dev] text encoder; the PNGs record both prompts.
    ``loras``: [{"file", "strength"}] stacked in order; read and checked against the transformer's shapes
    before anything big loads. ``edit_paths`` names the start image and mask files for the PNGs' parameters.
    """
    from ..pipelines.files.transformer_checkpoint import inspect_transformer, resolve_klein_mode
    from ..pipelines.generation.generate import generate
    from ..pipelines.models.text_encoder import load_text_encoder
    from ..pipelines.models.lora import VARIANT_NAMES, apply_loras, check_loras_fit
    from ..pipelines.models.transformer import load_transformer
    from ..pipelines.models.vae import load_vae
    from ..pipelines.parameters import defaults_for

    # The transformer's header says [dev] or [klein] (and distilled or base): its defaults, before any load.
    ckpt = inspect_transformer(paths["transformer"])
    try:
        distilled = resolve_klein_mode(ckpt, klein_mode)
        family = ckpt.family
        lora_entries = _lora_entries(loras, lora_merge)
        check_loras_fit(ckpt.config, lora_entries, VARIANT_NAMES.get(ckpt.variant, f"FLUX.2 [{family}]"))
        if ckpt.quantization == "gguf" and any(e.active and e.merge for e in lora_entries):
            # GGUF layers stay packed: merge mode would refuse them after the load; say so from the header
            mix = ", ".join(f"{t} x{n}" for t, (n, _) in ckpt.files.type_mix().items())
            raise Flux2KitError(
                f"--lora-merge cannot be used with {os.path.basename(paths['transformer'])}: it is a GGUF transformer "
                f"(GGUF {mix}) whose layers stay packed GGUF blocks and are never re-quantized (K-quants such as Q4_K "
                "cannot be), so LoRAs run on it as a side branch only, which gives the exact result. Leave out "
                "--lora-merge.")
    finally:
        ckpt.files.close()
    params = {k: v for k, v in params.items() if v is not None}
    params = {**{k: v for k, v in defaults_for(family, distilled).items() if k in ("num_inference_steps", "guidance")},
              **params}
    images = [open_image(p, n) for n, p in enumerate(image_paths, start=1)]
    job = GenerationRequest(images=tuple(images), **params).check()  # before loading tens of GB, not after
    cfg = family == "klein" and distilled is False and job.request.guidance > 1.0
    device = parse_device(device)
    text_encoder_device = parse_device(text_encoder_device) if text_encoder_device else device

    # The real encoder (24B) and transformer (32B) do not fit in memory together: encode the prompt,
    # free the encoder, then load the transformer.
    prompt, extra = job.request.prompt, {}
    text_encoder = None
    if upsample is not None:
        text_encoder, prompt, extra = upsample_prompt_files(paths["text_encoder"], upsample, prompt, images, job.request.seed,
                                                            device=text_encoder_device)
    if text_encoder is None:
        _announce_gguf(paths["text_encoder"], "text_encoder", text_encoder_device)
        with timed(f"Loading the text encoder from {paths['text_encoder']}"):
            text_encoder = load_text_encoder(paths["text_encoder"], device=text_encoder_device, tokenizer=tokenizer)
    with timed("Encoding the prompt"):
        encoded = text_encoder.encode(prompt)
        if cfg:  # [klein] base guides against the empty prompt
            encoded.negative = text_encoder.negative_embeds().embeds
    text_encoder.release()
    del text_encoder
    with timed(f"Loading the VAE from {paths['vae']}"):
        vae = load_vae(paths["vae"], device=device)
    _announce_gguf(paths["transformer"], "transformer", device)
    with timed(f"Loading the transformer from {paths['transformer']}"):
        transformer = load_transformer(paths["transformer"], device=device, offload_blocks=offload_blocks,
                                       klein_mode=klein_mode)
    if lora_entries:
        transformer = apply_loras(transformer, lora_entries)
        for entry in lora_entries:
            say(f"LoRA {entry.lora.name} at {entry.strength:g}: {entry.lora.format}; {entry.lora.summary()}.")
            for warning in entry.lora.warnings():
                say(f"  warning: {warning}")
    say(f"Transformer: {transformer.checkpoint}, on {device}.")

    n = job.request.batch_size
    say(f"Sampling {n} image{'s' if n > 1 else ''} of {job.width}x{job.height} in "
        f"{job.request.num_inference_steps} steps.")
    with CtrlC() as ctrl_c:
        pixels = generate(transformer, None, vae, job, prompt_embeds=encoded, callback=Progress(),
                          should_cancel=ctrl_c.pressed)
    if ctrl_c.pressed():  # pressed during decoding: the user still asked for no output
        raise KeyboardInterrupt

    edit_names = {k: os.path.basename(v) for k, v in (edit_paths or {}).items() if v}
    base = {**{k: v for k, v in params.items() if k not in ("start_image", "mask")}, **edit_names, **extra,
            "width": job.width, "height": job.height, "software": f"flux2kit {__version__}",
            "references": [os.path.basename(p) for p in image_paths],
            "models": {k: os.path.basename(os.path.normpath(v)) for k, v in paths.items()}}
    if lora_entries:
        base["loras"] = [{"file": e.lora.name, "strength": e.strength} for e in lora_entries]
    return save_pngs(pixels, out_dir, prefix, base)


def _lora_entries(loras, merge: bool) -> list:
    """The --lora files read (format checked, pickles refused) as LoraEntry objects, in order."""
    from ..pipelines.files.lora_formats import read_lora
    from ..pipelines.models.lora import LoraEntry

    entries = []
    for spec in loras:
        path = spec["file"]
        if not os.path.isfile(path):
            raise Flux2KitError(f"LoRA not found: {path}. Check the path.")
        strength = 1.0 if spec["strength"] is None else float(spec["strength"])
        entries.append(LoraEntry(read_lora(path), strength=strength, merge=merge))
    return entries


def _announce_gguf(path: str, kind: str, device) -> None:
    """A GGUF file's quantization mix and the memory it will take, before it loads."""
    from ..pipelines.devices import default_dtype
    from ..pipelines.files.gguf import is_gguf
    from ..pipelines.files.memory_estimate import describe_before_loading

    if os.path.isfile(path) and is_gguf(path):
        say(describe_before_loading(path, kind, default_dtype(device)))


def upsample_prompt_files(text_encoder_path: str, options: dict, prompt: str, images: list, seed: int, *, device):
    """Upsample ``prompt`` (``--upsample``): ``(encoder to encode with or None, new prompt, PNG metadata)``.

    With the generation's own encoder the loaded whole model also encodes (it encodes exactly like the trimmed
    one); a separate ``--upsample-text-encoder`` is freed at once.
    """
    from ..pipelines.models.full_text_encoder import load_full_text_encoder
    from ..pipelines.prompting.upsample import upsample_prompt

    path = options.get("text_encoder") or text_encoder_path
    with timed(f"Loading the whole text encoder for prompt upsampling from {path}"):
        encoder = load_full_text_encoder(path, device=device, vision=bool(images))
    for note in encoder.notes:
        say(f"note: {note}")
    with timed("Upsampling the prompt"), CtrlC() as ctrl_c:
        result = upsample_prompt(encoder, prompt, images, temperature=options["temperature"], seed=seed,
                                 max_new_tokens=options["max_new_tokens"], should_cancel=ctrl_c.pressed)
    for note in result.notes:
        say(f"note: {note}")
    say(f"Upsampled prompt ({result.mode}):\n{result.text}")
    extra = {"prompt": result.text, "original_prompt": prompt,
             "upsampling": {"mode": result.mode, "temperature": options["temperature"], "seed": seed,
                            "max_new_tokens": options["max_new_tokens"], "fell_back": result.fell_back}}
    if options.get("text_encoder") and os.path.abspath(path) != os.path.abspath(text_encoder_path):
        encoder.release()
        return None, result.text, extra
    return encoder, result.text, extra


def open_image(path: str, number: int, what: str | None = None):
    import PIL.Image
    import PIL.ImageOps

    what = what or f"Reference image {number}"
    try:
        with PIL.Image.open(path) as image:
            return PIL.ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    except FileNotFoundError:
        raise Flux2KitError(f"{what} not found: {path}. Check the path.") from None
    except (OSError, PIL.UnidentifiedImageError) as e:
        raise Flux2KitError(f"{what} ({path}) cannot be read as an image: {e}") from None


def start_image_mask(image_path: str, mask_path: str | None) -> dict:
    """``start_image`` and ``mask`` for the request: the mask file as grey levels, else the start image's
    transparency (transparent = repaint, as ComfyUI's Load Image makes its MASK)."""
    import numpy as np

    image = open_image(image_path, 0, what="Start image")
    out = {"start_image": image.convert("RGB")}
    if mask_path:
        out["mask"] = np.asarray(open_image(mask_path, 0, what="Mask").convert("L"), dtype=np.float32) / 255.0
    elif "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        out["mask"] = 1.0 - np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
    return out


def parse_device(name: str):
    import torch

    from ..pipelines.devices import default_device

    if name in (None, "", "auto"):
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Flux2KitError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Flux2KitError(f"--device {name}: CUDA is not available (no NVIDIA GPU, or a CPU-only torch). "
                            "Use --device cpu, or install a CUDA build of torch.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise Flux2KitError(f"--device {name}: Apple MPS is not available on this machine. Use --device cpu.")
    return device


def save_pngs(pixels, out_dir: str, prefix: str, base: dict) -> list[str]:
    """One PNG per image, numbered after the files already there; the parameters go in a tEXt chunk."""
    import numpy as np
    import PIL.Image
    import PIL.PngImagePlugin
    import torch

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)\.png$")
    counter = max((int(m.group(1)) for f in os.listdir(out_dir) if (m := pattern.match(f))), default=0) + 1
    arrays = pixels.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    saved = []
    for i, array in enumerate(arrays):
        params = {**base, "seed": (base["seed"] + i) % 2**64, "batch_index": i}
        info = PIL.PngImagePlugin.PngInfo()
        # ASCII JSON keeps it a plain tEXt chunk, readable by any PNG tool.
        info.add_text(PNG_KEY, json.dumps(params, ensure_ascii=True))
        image = PIL.Image.fromarray(np.ascontiguousarray(array), "RGB")
        while True:  # exclusive create: never overwrite an earlier image
            path = os.path.join(out_dir, f"{prefix}_{counter:05d}.png")
            counter += 1
            try:
                with open(path, "xb") as f:
                    image.save(f, format="PNG", pnginfo=info)
                break
            except FileExistsError:
                continue
        saved.append(path)
    return saved
