"""A whole text-to-image run on the CPU: ours vs diffusers' Flux2Pipeline on the same weights.

Model set: a random transformer of [dev] proportions (8 double + 48 single blocks, 128-wide heads,
guidance embedding; 6 heads by default, ~0.5B parameters) saved as a BFL bf16 file and as a
ComfyUI FP8 file, the tiny random Mistral3 text encoder (32 layers, width 128, so the text width is
384) and a random VAE of the real architecture (84M parameters). Contenders, timed interleaved in
this process, median of ``--runs``, each one full call: encode prompt -> sample -> decode.

- diffusers: ``Flux2Pipeline`` holding the same fp32 weights (the baseline);
- ours fp32: ``generate`` with ``load_transformer(bf16 file)``, ``load_text_encoder``, ``load_vae``;
- ours fp8:  the same with the FP8 file (FP8 kept, dequantized per layer).

    python bench/text_to_image.py            # about 5 minutes on 2 cores
    python bench/text_to_image.py --quick    # tiny smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

# _common is a sibling: `python bench/<script>.py` puts bench/ on sys.path
from _common import Row, contention_report, dev_proportions, interleaved_times, machine_facts, median, ratio, table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="timed runs per contender (median reported)")
    p.add_argument("--heads", type=int, default=6, help="attention heads of 128; 6 -> width 768, ~0.5B params")
    p.add_argument("--size", type=int, default=256, help="square image side in pixels")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per run")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="tiny models, 1 run: checks the script works")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.size, args.steps = 1, 64, 2
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3ForConditionalGeneration

    from flux2kit.pipelines.generation.generate import generate
    from flux2kit.pipelines.models.text_encoder import load_text_encoder
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3
    from flux2kit.pipelines.demo_models.transformer import build_tiny_transformer, fp8_reference, save_transformer
    from flux2kit.pipelines.demo_models.vae import build_tiny_vae, save_vae_ldm
    from flux2kit.pipelines.models.transformer import load_transformer
    from flux2kit.pipelines.models.vae import load_vae

    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="flux2kit-bench-t2i-")
    try:
        t0 = time.perf_counter()
        if args.quick:
            transformer = build_tiny_transformer(seed=0)
            vae = build_tiny_vae(seed=0)
        else:
            transformer = build_tiny_transformer(seed=0, **dev_proportions(args.heads, text_width=384))
            torch.manual_seed(0)
            vae = AutoencoderKLFlux2().eval()
        te_model, tokenizer = build_tiny_mistral3(seed=0)
        params = sum(p.numel() for p in transformer.parameters())
        bf16 = save_transformer(transformer, os.path.join(work, "bf16.safetensors"), "bfl")
        fp8 = save_transformer(transformer, os.path.join(work, "fp8.safetensors"), "comfy-fp8")
        vae_path = save_vae_ldm(vae, os.path.join(work, "vae.safetensors"))
        te_dir = save_tiny_mistral3(te_model, tokenizer, os.path.join(work, "te"), layout="pipeline")
        log(f"built and saved the model set ({params / 1e6:.0f}M transformer parameters) in {time.perf_counter() - t0:.0f} s")

        # diffusers' FP8 twin runs the dequantized weights, so both fp8 outputs can be compared too.
        pipes = {}
        for name, model in (("fp32", transformer), ("fp8", fp8_reference(transformer))):
            pipe = Flux2Pipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
                vae=vae, text_encoder=Mistral3ForConditionalGeneration.from_pretrained(te_dir, torch_dtype=torch.float32),
                tokenizer=tokenizer, transformer=model)
            pipe.set_progress_bar_config(disable=True)
            pipes[name] = pipe
        ours = dict(fp32=load_transformer(bf16, device="cpu"), fp8=load_transformer(fp8, device="cpu"))
        te = load_text_encoder(os.path.dirname(te_dir), device="cpu")
        our_vae = load_vae(vae_path, device="cpu")

        prompt = "a red fox in fresh snow, morning light, 35mm photograph"
        common = dict(height=args.size, width=args.size, num_inference_steps=args.steps)

        def run_diffusers():
            return pipes["fp32"](prompt=prompt, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(0),
                                 output_type="pt", **common).images

        def run_ours(kind):
            return lambda: generate(ours[kind], te, our_vae, prompt=prompt, guidance=4.0, seed=0, **common)

        with torch.inference_mode():
            check = (run_ours("fp32")() - run_diffusers().permute(0, 2, 3, 1)).abs().max().item()
        log(f"ours fp32 vs diffusers: max abs pixel difference {check:.2e}")
        times = interleaved_times({"diffusers": run_diffusers, "ours fp32": run_ours("fp32"), "ours fp8": run_ours("fp8")},
                                  runs=args.runs, progress=log)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: median(v) for k, v in times.items()}
    rows = [
        Row("diffusers Flux2Pipeline, fp32 (baseline)", f"{med['diffusers']:.2f} s"),
        Row("ours, bf16 file, fp32 compute", f"{med['ours fp32']:.2f} s", ratio(med["ours fp32"], med["diffusers"]), "<= 1.0"),
        Row("ours, ComfyUI FP8 file (FP8 kept)", f"{med['ours fp8']:.2f} s", ratio(med["ours fp8"], med["diffusers"]), "report"),
        Row("  ours fp8 / ours fp32", "", ratio(med["ours fp8"], med["ours fp32"]), "report"),
    ]
    busy, notes = contention_report(times)
    rows.append(busy)
    print(f"text-to-image, {args.size}x{args.size}, {args.steps} steps, 512 text tokens, "
          f"{params / 1e6:.0f}M-parameter transformer, median of {args.runs}")
    print(machine_facts())
    print(table(rows))
    print(f"ours fp32 vs diffusers: max abs pixel difference {check:.2e}")
    for note in notes:
        print(f"# {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
