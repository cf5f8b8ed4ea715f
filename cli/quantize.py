"""``flux2kit quantize IN OUT``: write a FLUX.2 transformer or text encoder as a ComfyUI FP8 file or a GGUF.

``--format fp8`` (default) writes ComfyUI's current FP8 format (per layer ``weight`` float8_e4m3fn,
``weight_scale`` fp32 scalar, ``comfy_quant``; plus the ``_quantization_metadata`` header entry).
``--format gguf-q8_0`` writes a GGUF Q8_0: transformers in ComfyUI-GGUF's layout, text encoders in
llama.cpp's (with their vocabulary). Both are written one tensor at a time, so a 64 GB bf16
transformer never needs 64 GB of memory.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..pipelines.errors import Flux2KitError

KINDS = ("auto", "transformer", "text-encoder")
FORMATS = ("fp8", "gguf-q8_0")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="a bf16 (or FP8) FLUX.2 transformer or text encoder: a .safetensors "
                        "file (BFL / ComfyUI layout) or a diffusers / Hugging Face folder")
    parser.add_argument("output", metavar="OUT", help="the file to write: FP8 .safetensors or .gguf (e.g. in "
                        "ComfyUI's models/diffusion_models or models/text_encoders)")
    parser.add_argument("--format", choices=FORMATS, default="fp8",
                        help="fp8: ComfyUI's FP8 safetensors (default); gguf-q8_0: a GGUF with 8.5-bit Q8_0 weights "
                             "(ComfyUI-GGUF's layout for transformers, llama.cpp's for text encoders)")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="what IN is; auto tries a transformer first, then a text encoder (default: auto)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="text encoders: a tokenizer folder to store as the Mistral file's tekken_model or the "
                             "GGUF's vocabulary (default: the one inside IN or next to it)")
    parser.add_argument("--no-header-metadata", action="store_true",
                        help="list the FP8 layers only in per-layer comfy_quant tensors, not also in the "
                             "_quantization_metadata header entry")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def quantize_command(args: argparse.Namespace) -> int:
    """Run ``flux2kit quantize``; prints the written path on stdout. User errors raise Flux2KitError."""
    from ..pipelines.files.gguf_writer import save_gguf_text_encoder, save_gguf_transformer
    from ..pipelines.files.quantize import save_fp8_transformer, save_text_encoder_file

    src, out = os.fspath(args.input), os.fspath(args.output)
    if not os.path.exists(src):
        raise Flux2KitError(f"{src} does not exist. Give the bf16 model file or folder to quantize.")
    if os.path.exists(out) and not args.force:
        raise Flux2KitError(f"{out} already exists. Choose another output name or pass --force to overwrite it.")
    if os.path.abspath(out) == os.path.abspath(src):
        raise Flux2KitError("OUT is the same file as IN; write the quantized file under another name.")
    fmt = getattr(args, "format", "fp8")
    if fmt.startswith("gguf") != out.lower().endswith(".gguf"):  # ComfyUI lists files by their extension
        raise Flux2KitError(f"OUT must end in .gguf with --format gguf-*, and not otherwise ({fmt} writes a "
                            f"{'GGUF' if fmt.startswith('gguf') else 'safetensors'} file).")
    header = not args.no_header_metadata
    kind = args.kind
    if kind == "auto":
        kind = _detect_kind(src)
    if fmt.startswith("gguf"):
        ggml_type = fmt.split("-", 1)[1].upper()
        if kind == "transformer":
            path = save_gguf_transformer(src, out, ggml_type=ggml_type)
        else:
            path = save_gguf_text_encoder(src, out, ggml_type=ggml_type, tokenizer=args.tokenizer)
        where = f"GGUF {ggml_type}"
    elif kind == "transformer":
        path = save_fp8_transformer(src, out, header_metadata=header)
        where = "ComfyUI FP8 format"
    else:
        path = save_text_encoder_file(src, out, quantize=True, tokenizer=args.tokenizer, header_metadata=header)
        where = "ComfyUI FP8 format"
    size = os.path.getsize(path) / 2**30
    print(f"flux2kit: wrote {kind} in {where} ({size:.2f} GiB)", file=sys.stderr)
    print(path)
    return 0


def _detect_kind(src: str) -> str:
    from ..pipelines.files.transformer_checkpoint import inspect_transformer

    try:
        inspect_transformer(src).files.close()
        return "transformer"
    except Flux2KitError as transformer_error:
        if "text encoder" in str(transformer_error) or os.path.isdir(src):
            return "text-encoder"
        raise
