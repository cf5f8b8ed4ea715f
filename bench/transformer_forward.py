"""One FLUX.2 transformer forward on the CPU: ours vs diffusers (fp32), ours FP8 vs ours fp32, and peak RSS.

A random model of [dev] proportions (8 double + 48 single blocks, 128-wide heads, guidance
embedding; 6 heads by default, ~0.5B parameters) is saved as a BFL bf16 file, a ComfyUI FP8 file
and a diffusers folder. Contenders, timed interleaved in this process, median of ``--runs``:

- diffusers: ``Flux2Transformer2DModel`` holding the same fp32 weights (built in memory);
- ours fp32: ``load_transformer(bf16 file, device="cpu")``;
- ours fp8:  ``load_transformer(fp8 file, device="cpu")`` (FP8 kept, dequantized per layer).

Peak RSS of each load, and of its first forward, is measured in a fresh interpreter and divided by
the file size.

    python bench/transformer_forward.py            # ~0.5B model, about 2.5 minutes on 2 cores
    python bench/transformer_forward.py --quick    # tiny smoke run, ~20 s (mostly interpreter start-up)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

# _common is a sibling: `python bench/<script>.py` puts bench/ on sys.path
from _common import (
    Row, RssMeter, Timings, add_forward_arguments, contention_report, dev_proportions, gib, interleaved_times,
    load_average, print_report, print_result, ratio, run_measurements,
)

QUICK = dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=2,
             joint_attention_dim=384, guidance_embeds=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_forward_arguments(p)
    p.add_argument("--measure-load", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.image_size, args.text_len = min(args.runs, 2), 64, 8
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- files, inputs, forwards ------------------------------------------------------------------------

def save_files(model, workdir: str) -> dict[str, str]:
    from flux2kit.pipelines.demo_models.transformer import save_transformer

    return {
        "bf16": save_transformer(model, os.path.join(workdir, "bfl-bf16.safetensors"), "bfl"),
        "fp8": save_transformer(model, os.path.join(workdir, "comfy-fp8.safetensors"), "comfy-fp8"),
        "diffusers": save_transformer(model, os.path.join(workdir, "diffusers"), "diffusers"),
    }


def size_of(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if f.endswith(".safetensors"))


def inputs(text_width: int, image_size: int, text_len: int, seed: int = 1) -> dict:
    """One image's tokens: (image_size / 16)^2 latent tokens of 128 channels, plus text."""
    import torch

    from flux2kit.pipelines.generation import sampling

    side = max(1, image_size // 16)
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(1, side * side, 128, generator=g), latent_ids=sampling.latent_ids(1, side, side),
                text=torch.randn(1, text_len, text_width, generator=g), text_ids=sampling.text_ids(1, text_len),
                sigma=torch.full((1,), 0.7), guidance=torch.full((1,), 4.0))


def diffusers_forward(model, x):
    return model(hidden_states=x["latents"], encoder_hidden_states=x["text"], timestep=x["sigma"],
                 img_ids=x["latent_ids"], txt_ids=x["text_ids"], guidance=x["guidance"], return_dict=False)[0]


def ours_forward(t, x):
    return t(x["latents"], x["latent_ids"], x["text"], x["text_ids"], x["sigma"], x["guidance"])


# -- the subprocess side: one load and its first forward, their memory -------------------------------

def measure_load(kind: str, path: str, image_size: int, text_len: int) -> dict:
    """RSS growth of one load, then of its first forward; runs in a fresh interpreter after its imports.

    The forward matters: safetensors maps the file and our loader keeps FP8 weights as views of that
    mapping, so they become resident only when the forward reads them.
    """
    import torch
    from diffusers import Flux2Transformer2DModel

    from flux2kit.pipelines.models.transformer import load_transformer

    meter = RssMeter()
    start = time.perf_counter()
    if kind == "ours":
        model = load_transformer(path, device="cpu")
        forward, text_width = ours_forward, model.text_width
    else:
        model = Flux2Transformer2DModel.from_pretrained(os.path.join(path, "transformer"), torch_dtype=torch.float32)
        forward, text_width = diffusers_forward, model.config.joint_attention_dim
    result = {"load_seconds": time.perf_counter() - start, "load_peak": meter.peak(), "load_anon": meter.anon_peak()}
    x = inputs(text_width, image_size, text_len)
    with torch.inference_mode():
        forward(model, x)
    result.update(forward_peak=meter.peak(), forward_anon=meter.anon_peak())
    meter.stop()
    return result


# -- the main side ----------------------------------------------------------------------------------

def measure_memory(args, files: dict[str, str]) -> dict[str, dict]:
    """Each load (and its first forward) in a fresh interpreter running this script with --measure-load."""
    script = os.path.abspath(__file__)
    cmd = lambda kind, key: [script, "--measure-load", kind, "--path", files[key], "--threads",  # noqa: E731
                             str(args.threads), "--image-size", str(args.image_size), "--text-len", str(args.text_len)]
    # Memory is per process, so loads may overlap (--quick); the timings run alone afterwards.
    return run_measurements({"ours fp8": cmd("ours", "fp8"), "ours bf16->fp32": cmd("ours", "bf16"),
                             "diffusers": cmd("diffusers", "diffusers")}, parallel=2 if args.quick else 1)


def time_forwards(args, model, files: dict[str, str], x: dict) -> tuple[Timings, float, float]:
    """Interleaved forward times of the three contenders, and how far their outputs are apart."""
    import torch

    from flux2kit.pipelines.models.transformer import load_transformer

    ours32 = load_transformer(files["bf16"], device="cpu")
    ours8 = load_transformer(files["fp8"], device="cpu")
    with torch.inference_mode():
        ref, out32, out8 = diffusers_forward(model, x), ours_forward(ours32, x), ours_forward(ours8, x)
        max_diff = (out32 - ref).abs().max().item()
        fp8_rel = ((out8 - out32).norm() / out32.norm()).item()
        del ref, out32, out8
        log(f"max |ours fp32 - diffusers| = {max_diff:.2e}; FP8 relative error {fp8_rel:.2e}")
        times = interleaved_times({
            "diffusers fp32": lambda: diffusers_forward(model, x),
            "ours fp32": lambda: ours_forward(ours32, x),
            "ours fp8": lambda: ours_forward(ours8, x),
        }, runs=args.runs, progress=log)
    return times, max_diff, fp8_rel


def run(args) -> tuple[list[Row], list[str]]:
    """Build, save, measure; returns the table rows and notes to print under the table."""
    import torch

    from flux2kit.pipelines.demo_models.transformer import build_tiny_transformer

    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else dev_proportions(args.heads)
    log(f"building a random model: {config}")
    model = build_tiny_transformer(seed=0, **config)
    n_params = sum(p.numel() for p in model.parameters())
    x = inputs(config["joint_attention_dim"], args.image_size, args.text_len)
    image_tokens, text_tokens = x["latents"].shape[1], x["text"].shape[1]
    log(f"{n_params / 1e9:.3f} B parameters; {image_tokens} image + {text_tokens} text tokens")

    workdir = args.workdir or tempfile.mkdtemp(prefix="flux2kit-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        files = save_files(model, workdir)
        sizes = {k: size_of(p) for k, p in files.items()}
        log(f"files in {workdir}: " + ", ".join(f"{k} {gib(v)}" for k, v in sizes.items()))
        log("measuring RSS of each load in a fresh process ...")
        memory = measure_memory(args, files)
        log(f"timing forwards (load average {load_average()}) ...")
        times, max_diff, fp8_rel = time_forwards(args, model, files, x)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    t = {k: times.median(k) for k in times}
    value = times.summary
    rows = [
        Row("model", f"{n_params / 1e9:.3f} B params, width {config['num_attention_heads'] * 128}, "
                     f"{config['num_layers']}+{config['num_single_layers']} blocks"),
        Row("tokens", f"{image_tokens} image ({args.image_size}px) + {text_tokens} text"),
        Row(f"forward diffusers fp32 (median of {args.runs})", value("diffusers fp32"), "1.000", "baseline"),
        Row("forward ours fp32 / diffusers fp32", value("ours fp32"), ratio(t["ours fp32"], t["diffusers fp32"]),
            "<= 1.0"),
        Row("forward ours fp8 file / ours fp32", value("ours fp8"), ratio(t["ours fp8"], t["ours fp32"]),
            "<= 1.15 (aim)"),
        contention_report(times)[0],
        Row("max |ours fp32 - diffusers|", f"{max_diff:.2e}", "", "~0 (same weights)"),
        Row("relative error ours fp8 vs fp32", f"{fp8_rel:.2e}", "", "report (FP8 rounding)"),
        Row("file size fp8 (ComfyUI) / bf16 (BFL)", f"{gib(sizes['fp8'])} / {gib(sizes['bf16'])}",
            ratio(sizes["fp8"], sizes["bf16"]), ""),
    ]
    for name, key, label, target in (
            ("ours fp8", "fp8", "ours, fp8 file", "report"),
            ("ours bf16->fp32", "bf16", "ours, bf16 file -> fp32", "~2 (fp32 = 2x bf16)"),
            ("diffusers", "diffusers", "diffusers from_pretrained bf16 -> fp32", "context")):
        m = memory[name]
        anon = lambda n: "" if n is None else f", anon {gib(n)}"  # noqa: E731
        rows.append(Row(f"peak RSS {label}: load / file",
                        f"{gib(m['load_peak'])}{anon(m['load_anon'])} ({m['load_seconds']:.1f} s)",
                        ratio(m["load_peak"], sizes[key]), target))
        rows.append(Row(f"peak RSS {label}: load + 1st forward / file",
                        f"{gib(m['forward_peak'])}{anon(m['forward_anon'])}", ratio(m["forward_peak"], sizes[key]),
                        target))
    return rows, contention_report(times)[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_load:
        import torch

        torch.set_num_threads(args.threads)
        print_result(measure_load(args.measure_load, args.path, args.image_size, args.text_len))
        return 0
    return print_report(f"transformer forward{' (--quick)' if args.quick else ''}", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
