"""The ``flux2kit`` command, no ComfyUI needed.

``flux2kit demo`` builds tiny random FLUX.2 models and makes one (noise-like) image in seconds on a
CPU, proving the install works; ``flux2kit generate`` does the same with the real FLUX.2 files;
``flux2kit run`` runs a ComfyUI workflow (API format) in-process or on a ComfyUI server;
``flux2kit batch`` runs one over many inputs, across servers, resumable (batch/);
``flux2kit quantize`` writes a model as a ComfyUI FP8 file (quantize_cli.py).
Images go to PNG files whose paths are printed on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time

from . import __version__
from .pipelines.errors import Flux2KitError
from .pipelines.parameters import ASPECT_RATIOS, DEFAULTS, RESOLUTIONS

EXIT_ERROR = 2
EXIT_CANCELLED = 130  # the shell's code for "stopped by Ctrl-C"
DEMO_PROMPT = "A red fox sitting in a snowy forest at dawn, soft golden light, shallow depth of field."
DEMO_STEPS = 4
PNG_KEY = "parameters"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 a problem the message explains, 130 cancelled)."""
    args = build_parser().parse_args(argv)
    from .pipelines.sampling import Cancelled

    try:
        code = args.command(args)
    except Flux2KitError as e:
        print(f"flux2kit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (Cancelled, KeyboardInterrupt):
        print("\nflux2kit: cancelled; nothing was saved.", file=sys.stderr)
        return EXIT_CANCELLED
    return code if isinstance(code, int) else 0


# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2kit", description="FLUX.2 image generation from the command line.")
    parser.add_argument("--version", action="version", version=f"flux2kit {__version__}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="make an image with tiny random models (a quick check that everything runs; no downloads)",
        description="Build tiny FLUX.2 models with random weights (once) and make one image on the CPU. "
        "The weights are untrained, so the image looks like coloured noise: this checks the install, "
        "not the model.")
    add = demo.add_argument
    add("--models", default="./demo-models", metavar="DIR", help="folder for the tiny models (default: ./demo-models)")
    add("--out", default="./output", metavar="DIR", help="folder for the PNG (default: ./output)")
    add("--prompt", default=DEMO_PROMPT, metavar="TEXT", help="the prompt")
    add("--seed", type=int, default=0, metavar="N", help="noise seed (default: 0)")
    add("--steps", type=int, default=DEMO_STEPS, metavar="N", help=f"sampling steps (default: {DEMO_STEPS})")
    add("--size", type=_size, default=(256, 256), metavar="WxH", help="image size (default: 256x256)")
    demo.set_defaults(command=run_demo)

    dev = DEFAULTS["dev"]
    gen = sub.add_parser(
        "generate", help="make images with the FLUX.2 [dev] or [klein] files",
        description="Make images with FLUX.2 [dev] or [klein]: a transformer file (BFL, ComfyUI or diffusers "
        "layout, bf16 or FP8), its text encoder (Mistral-Small-3 for [dev], Qwen3 for [klein]: a Hugging Face "
        "folder or a ComfyUI single file) and the VAE.")
    add = gen.add_argument
    add("--transformer", required=True, metavar="PATH", help="transformer file or diffusers folder")
    add("--text-encoder", required=True, metavar="PATH",
        help="text encoder: a Hugging Face folder or a ComfyUI single file (Mistral-Small-3 for [dev], Qwen3 for [klein])")
    add("--tokenizer", metavar="DIR", help="tokenizer folder for a Qwen3 single-file text encoder (it carries none)")
    add("--vae", required=True, metavar="PATH", help="VAE file (flux2-vae.safetensors) or diffusers folder")
    add("--prompt", default="", metavar="TEXT", help="text or a JSON prompt (may be empty when --image is given)")
    add("--image", dest="images", action="extend", nargs="+", default=[], metavar="PATH",
        help="reference image(s), numbered 1..N in the order given (up to 10)")
    add("--aspect-ratio", choices=ASPECT_RATIOS, default="1:1", help="default: 1:1")
    add("--resolution", type=_resolution, default="1 MP", metavar="MP",
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
    add("--klein-mode", choices=("auto", "distilled", "base"), default="auto",
        help="[klein] only: distilled or base (identical tensors; auto reads the file's metadata and asks when "
             "it says nothing)")
    add("--seed", type=int, default=0, metavar="N", help="noise seed; image i of a batch uses seed + i (default: 0)")
    add("--batch-size", type=int, default=1, metavar="N", help="images to make, 1-16 (default: 1)")
    add("--out", default="./output", metavar="DIR", help="folder for the PNGs (default: ./output)")
    add("--device", default="auto", metavar="DEVICE", help="auto (CUDA if there, else CPU), cpu, cuda, cuda:N or mps")
    add("--text-encoder-device", metavar="DEVICE", help="where to run the text encoder (default: --device)")
    add("--offload-blocks", action="store_true",
        help="keep transformer blocks in RAM and move each to the GPU only while it runs")
    gen.set_defaults(command=run_generate)

    from .headless import add_run_arguments

    run = sub.add_parser(
        "run", help="run a ComfyUI workflow (API format): in-process on flux2kit's nodes, or on a ComfyUI server",
        description="Run a workflow saved in ComfyUI's API format (e.g. workflows/api/text_to_image.json) and save "
        "its images. In-process (no ComfyUI needed) it runs flux2kit's nodes and LoadImage on the models in --models, "
        "by default the tiny random demo models; with --server URL it runs on that ComfyUI. Prints the image paths.")
    add_run_arguments(run)
    run.set_defaults(command=run_workflow)

    from .batch import add_batch_arguments

    batch = sub.add_parser(
        "batch", help="run a workflow over a list of inputs on ComfyUI servers or in-process; resumable",
        description="Run one workflow (API or UI format) once per row of INPUTS (JSONL or CSV) and per --sweep "
        "value, spread over ComfyUI servers (--server URL, repeatable) or in this process (--target local). "
        "Every row is checked before anything runs. Progress is kept in DIR/batch.sqlite: run the same command "
        "again after a stop or a crash and it collects what finished and runs only the rest.")
    add_batch_arguments(batch)
    batch.set_defaults(command=run_batch)

    from .quantize_cli import add_quantize_arguments, quantize_command

    quantize = sub.add_parser(
        "quantize", help="write a bf16 FLUX.2 transformer or text encoder as a ComfyUI FP8 file",
        description="Quantize a FLUX.2 transformer or text encoder to float8_e4m3fn (one scale per tensor) and write "
        "it in ComfyUI's current FP8 format, one tensor at a time. ComfyUI's loaders and flux2kit's read the result.")
    add_quantize_arguments(quantize)
    quantize.set_defaults(command=quantize_command)
    return parser


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 256x256, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _resolution(text: str) -> str:
    try:
        megapixels = float(re.sub(r"\s*mp$", "", text.strip().lower()))
    except ValueError:
        megapixels = None
    for name, value in RESOLUTIONS.items():
        if value == megapixels:
            return name
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(RESOLUTIONS)}, got {text!r}")


# ---------------------------------------------------------------------------------------------
# Commands


def run_demo(args) -> None:
    from .pipelines.tiny import build_demo_models, demo_models_ready

    folder = os.path.abspath(args.models)
    if demo_models_ready(folder):
        _say(f"Using the tiny demo models in {folder}.")
    else:
        _say(f"Building tiny demo models in {folder} (once; about 25 MB, a few seconds)...")
    paths = build_demo_models(folder)
    _say("The demo models have RANDOM weights: the image will look like coloured noise, not a picture. "
         "It shows that flux2kit runs; use `flux2kit generate` with the FLUX.2 [dev] files for real images.")
    width, height = args.size
    params = dict(prompt=args.prompt, width=width, height=height, num_inference_steps=args.steps,
                  guidance=DEFAULTS["dev"]["guidance"], seed=args.seed, batch_size=1)
    saved = _generate(paths, params, [], out_dir=args.out, device="cpu", text_encoder_device="cpu",
                      offload_blocks=False, prefix="flux2kit_demo")
    print(saved[-1])


def run_generate(args) -> None:
    paths = {"transformer": args.transformer, "text_encoder": args.text_encoder, "vae": args.vae}
    params = dict(prompt=args.prompt, aspect_ratio=args.aspect_ratio, resolution=args.resolution, width=args.width,
                  height=args.height, num_inference_steps=args.steps, guidance=args.guidance, seed=args.seed,
                  batch_size=args.batch_size)
    saved = _generate(paths, params, args.images, out_dir=args.out, device=args.device,
                      text_encoder_device=args.text_encoder_device, offload_blocks=args.offload_blocks,
                      prefix="flux2kit", klein_mode=args.klein_mode, tokenizer=args.tokenizer)
    for path in saved:
        print(path)


def run_workflow(args) -> None:
    from .headless import run_command

    for path in run_command(args):
        print(path)


def run_batch(args) -> None:
    from .batch import batch_command

    batch_command(args)


# ---------------------------------------------------------------------------------------------
# The run: check, encode the prompt, load, sample, save


def _generate(paths: dict, params: dict, image_paths: list[str], *, out_dir: str, device, text_encoder_device,
              offload_blocks: bool, prefix: str, klein_mode: str = "auto", tokenizer: str | None = None) -> list[str]:
    """Make the images and save them as PNGs; returns their absolute paths."""
    from .pipelines.checkpoint_formats import inspect_transformer, resolve_klein_mode
    from .pipelines.generate import generate
    from .pipelines.parameters import defaults_for
    from .pipelines.text_encoder import load_text_encoder
    from .pipelines.transformer import load_transformer
    from .pipelines.vae import load_vae

    # The transformer's header says [dev] or [klein] (and distilled or base): its defaults, before any load.
    ckpt = inspect_transformer(paths["transformer"])
    try:
        distilled = resolve_klein_mode(ckpt, klein_mode)
        family = ckpt.family
    finally:
        ckpt.files.close()
    params = {k: v for k, v in params.items() if v is not None}
    params = {**{k: v for k, v in defaults_for(family, distilled).items() if k in ("num_inference_steps", "guidance")},
              **params}
    cfg = family == "klein" and distilled is False and params["guidance"] > 1.0
    images = [_open_image(p, n) for n, p in enumerate(image_paths, start=1)]
    width, height = _check_parameters(params, images)  # before loading tens of GB, not after
    device = _device(device)
    text_encoder_device = _device(text_encoder_device) if text_encoder_device else device

    # The real encoder (24B) and transformer (32B) do not fit in memory together: encode the prompt,
    # free the encoder, then load the transformer.
    with _timed(f"Loading the text encoder from {paths['text_encoder']}"):
        text_encoder = load_text_encoder(paths["text_encoder"], device=text_encoder_device, tokenizer=tokenizer)
    with _timed("Encoding the prompt"):
        embeds = text_encoder.encode(params["prompt"]).embeds
        negative = text_encoder.negative_embeds().embeds if cfg else None  # [klein] base: the empty prompt
    text_encoder.release()
    del text_encoder
    with _timed(f"Loading the VAE from {paths['vae']}"):
        vae = load_vae(paths["vae"], device=device)
    with _timed(f"Loading the transformer from {paths['transformer']}"):
        transformer = load_transformer(paths["transformer"], device=device, offload_blocks=offload_blocks,
                                       klein_mode=klein_mode)
    _say(f"Transformer: {transformer.checkpoint}, on {device}.")

    n = params["batch_size"]
    _say(f"Sampling {n} image{'s' if n > 1 else ''} of {width}x{height} in {params['num_inference_steps']} steps.")
    with _CtrlC() as ctrl_c:
        pixels = generate(transformer, None, vae, prompt_embeds=embeds, negative_embeds=negative, images=images,
                          callback=_Progress(), should_cancel=ctrl_c.pressed, **params)
    if ctrl_c.pressed():  # pressed during decoding: the user still asked for no output
        raise KeyboardInterrupt

    base = {**params, "width": width, "height": height, "software": f"flux2kit {__version__}",
            "references": [os.path.basename(p) for p in image_paths],
            "models": {k: os.path.basename(os.path.normpath(v)) for k, v in paths.items()}}
    return _save_pngs(pixels, out_dir, prefix, base)


def _check_parameters(params: dict, images: list) -> tuple[int, int]:
    """The checks ``generate`` makes first, made before anything loads; returns (width, height)."""
    from .pipelines.parameters import check_generation, resolve_size
    from .pipelines.references import check_reference

    if not params["prompt"].strip() and not images:
        raise Flux2KitError("The prompt is empty and no reference image is given: pass --prompt TEXT or --image PATH.")
    for number, image in enumerate(images, start=1):
        check_reference(image, number)
    size = resolve_size(params.get("aspect_ratio", "1:1"), params.get("resolution", "1 MP"), params.get("width"),
                        params.get("height"), images[0].size if images else None)
    check_generation(params["num_inference_steps"], params["guidance"], params["seed"], params["batch_size"])
    return size


def _open_image(path: str, number: int):
    import PIL.Image
    import PIL.ImageOps

    try:
        with PIL.Image.open(path) as image:
            return PIL.ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    except FileNotFoundError:
        raise Flux2KitError(f"Reference image {number} not found: {path}. Check the path.") from None
    except (OSError, PIL.UnidentifiedImageError) as e:
        raise Flux2KitError(f"Reference image {number} ({path}) cannot be read as an image: {e}") from None


def _device(name: str):
    import torch

    from .pipelines.devices import default_device

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


def _save_pngs(pixels, out_dir: str, prefix: str, base: dict) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# Terminal: messages, progress, Ctrl-C


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _timed(what: str):
    _say(f"{what}...")
    start = time.monotonic()
    yield
    _say(f"  done in {time.monotonic() - start:.1f} s")


class _Progress:
    """``step 3/28 [#####.......] 1.9 s/step, 47 s left`` on stderr; redrawn in place on a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.inplace = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, step: int, total: int, latents=None) -> None:
        per_step = (time.monotonic() - self.start) / step
        filled = round(20 * step / total)
        line = (f"step {step}/{total} [{'#' * filled}{'.' * (20 - filled)}] {per_step:.2f} s/step, "
                f"{per_step * (total - step):.0f} s left")
        if self.inplace:
            self.stream.write("\r" + line + ("\n" if step == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class _CtrlC:
    """While active, the first Ctrl-C asks sampling to stop before its next step; a second one stops at once."""

    def __init__(self):
        self._pressed = False
        self._previous = None

    def pressed(self) -> bool:
        return self._pressed

    def _handle(self, signum, frame):
        if self._pressed:
            raise KeyboardInterrupt
        self._pressed = True
        _say("\nCancelling after this step (Ctrl-C again to stop now)...")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


if __name__ == "__main__":
    sys.exit(main())
