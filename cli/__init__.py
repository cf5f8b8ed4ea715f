"""The ``flux2kit`` command: everything that drives the pack from outside ComfyUI.

``flux2kit demo`` builds tiny random FLUX.2 models and makes one (noise-like) image in seconds on a
CPU, proving the install works; ``flux2kit generate`` does the same with the real FLUX.2 files
(generate.py); ``flux2kit run`` runs a ComfyUI workflow in-process or on a ComfyUI server (run.py);
``flux2kit batch`` runs one over many inputs, across servers, resumable (batch/); ``flux2kit
quantize`` writes a model as a ComfyUI FP8 file or a GGUF (quantize.py).
Images go to files whose paths are printed on stdout; everything else goes to stderr.

This room may import the engine (``pipelines``), the nodes and, for the in-process runner, ComfyUI's
modules (or their stand-in); nothing imports it.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..pipelines.errors import Flux2KitError

EXIT_ERROR = 2
EXIT_CANCELLED = 130  # the shell's code for "stopped by Ctrl-C"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 a problem the message explains, 130 cancelled)."""
    args = build_parser().parse_args(argv)
    from ..pipelines.generation.sampling import Cancelled

    try:
        code = args.command(args)
    except Flux2KitError as e:
        print(f"flux2kit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (Cancelled, KeyboardInterrupt):
        print("\nflux2kit: cancelled; nothing was saved.", file=sys.stderr)
        return EXIT_CANCELLED
    return code if isinstance(code, int) else 0


def build_parser() -> argparse.ArgumentParser:
    from .batch import add_batch_arguments, batch_command
    from .generate import add_demo_arguments, add_generate_arguments, run_demo, run_generate
    from .quantize import add_quantize_arguments, quantize_command
    from .run import add_run_arguments, run_workflow

    parser = argparse.ArgumentParser(prog="flux2kit", description="FLUX.2 image generation from the command line.")
    parser.add_argument("--version", action="version", version=f"flux2kit {__version__}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="make an image with tiny random models (a quick check that everything runs; no downloads)",
        description="Build tiny FLUX.2 models with random weights (once) and make one image on the CPU. "
        "The weights are untrained, so the image looks like coloured noise: this checks the install, "
        "not the model.")
    add_demo_arguments(demo)
    demo.set_defaults(command=run_demo)

    gen = sub.add_parser(
        "generate", help="make images with the FLUX.2 [dev] or [klein] files",
        description="Make images with FLUX.2 [dev] or [klein]: a transformer file (BFL, ComfyUI or diffusers "
        "layout, bf16 or FP8), its text encoder (Mistral-Small-3 for [dev], Qwen3 for [klein]: a Hugging Face "
        "folder or a ComfyUI single file) and the VAE.")
    add_generate_arguments(gen)
    gen.set_defaults(command=run_generate)

    run = sub.add_parser(
        "run", help="run a ComfyUI workflow (API format): in-process on flux2kit's nodes, or on a ComfyUI server",
        description="Run a workflow saved in ComfyUI's API format (e.g. workflows/api/text_to_image.json) and save "
        "its images. In-process (no ComfyUI needed) it runs flux2kit's nodes and LoadImage on the models in --models, "
        "by default the tiny random demo models; with --server URL it runs on that ComfyUI. Prints the image paths.")
    add_run_arguments(run)
    run.set_defaults(command=run_workflow)

    batch = sub.add_parser(
        "batch", help="run a workflow over a list of inputs on ComfyUI servers or in-process; resumable",
        description="Run one workflow (API or UI format) once per row of INPUTS (JSONL or CSV) and per --sweep "
        "value, spread over ComfyUI servers (--server URL, repeatable) or in this process (--target local). "
        "Every row is checked before anything runs. Progress is kept in DIR/batch.sqlite: run the same command "
        "again after a stop or a crash and it collects what finished and runs only the rest.")
    add_batch_arguments(batch)
    batch.set_defaults(command=batch_command)

    quantize = sub.add_parser(
        "quantize", help="write a bf16 FLUX.2 transformer or text encoder as a ComfyUI FP8 file or a GGUF Q8_0",
        description="Quantize a FLUX.2 transformer or text encoder to float8_e4m3fn (one scale per tensor) and write "
        "it in ComfyUI's current FP8 format, or (--format gguf-q8_0) to GGUF Q8_0 in ComfyUI-GGUF's / llama.cpp's "
        "layout, one tensor at a time. ComfyUI's loaders (ComfyUI-GGUF's for GGUF) and flux2kit's read the result.")
    add_quantize_arguments(quantize)
    quantize.set_defaults(command=quantize_command)
    return parser
