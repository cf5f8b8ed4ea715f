"""GGUF transformers on the CPU: forward time of Q8_0 and Q4_K against fp32 and FP8, peak RSS per file size,
dequantization and header parsing, all in one invocation.

A random model of [dev] proportions (``_common.dev_proportions``; 6 heads by default, ~0.5B parameters)
is saved as a BFL bf16 file, a ComfyUI FP8 file, a GGUF Q8_0 (``flux2kit quantize --format gguf-q8_0``'s
writer) and a GGUF Q4_K (random valid Q4_K blocks: gguf cannot quantize K-quants, and the values do
not change the time). Contenders, timed interleaved in this process, median of ``--runs``:

- ours fp32: ``load_transformer(bf16 file)``; ours fp8: ``load_transformer(fp8 file)`` (dequantized per layer);
- ours Q8_0 / ours Q4_K: ``load_transformer(gguf)``, weights kept packed, dequantized per layer;
- diffusers Q8_0: ``Flux2Transformer2DModel.from_single_file(gguf, GGUFQuantizationConfig)`` (context).

Also: one layer's dequantization, ours (diffusers' block functions with fp32 scales) against diffusers'
default (fp16 scales); and reading a GGUF header with a 131k-token vocabulary (what Mistral / Qwen3 GGUFs
carry), ours against ``gguf.GGUFReader``. Peak RSS of each load and its first forward is measured in a
fresh interpreter and divided by the file size.

    python bench/gguf_forward.py            # ~0.5B model, a few minutes on 2 cores
    python bench/gguf_forward.py --quick    # tiny smoke run
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
    Row, RssMeter, Timings, add_forward_arguments, dev_proportions, gib, interleaved_times, load_average,
    print_report, print_result, ratio, run_measurements,
)
# the same model, tokens and forward calls as the FP8 benchmark
from transformer_forward import QUICK, diffusers_forward, inputs, ours_forward


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_forward_arguments(p)
    p.add_argument("--measure-load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.image_size, args.text_len = min(args.runs, 2), 64, 8
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- files ------------------------------------------------------------------------------------------

def save_files(model, workdir: str) -> dict[str, str]:
    from flux2kit.pipelines.demo_models.gguf import save_tiny_transformer_gguf
    from flux2kit.pipelines.demo_models.transformer import save_transformer
    from flux2kit.pipelines.files.gguf_writer import save_gguf_transformer

    files = {"bf16": save_transformer(model, os.path.join(workdir, "bfl-bf16.safetensors"), "bfl"),
             "fp8": save_transformer(model, os.path.join(workdir, "comfy-fp8.safetensors"), "comfy-fp8")}
    files["q8_0"] = save_gguf_transformer(files["bf16"], os.path.join(workdir, "Q8_0.gguf"), ggml_type="Q8_0")
    files["q4_k"] = os.path.join(workdir, "Q4_K.gguf")
    save_tiny_transformer_gguf(model, files["q4_k"], "Q4_K")
    model.save_config(os.path.join(workdir, "config"))
    return files


def vocabulary_gguf(path: str, tokens: int = 131072, merges: int = 269000) -> str:
    """A GGUF whose metadata is a Mistral-sized vocabulary (tokens, types, merges) and one tiny tensor."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(tokens)])
    w.add_token_types([1] * tokens)
    w.add_token_merges([f"a{i} b{i}" for i in range(merges)])
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- the subprocess side ------------------------------------------------------------------------------

def measure_load(path: str, image_size: int, text_len: int) -> dict:
    """RSS growth of one load, then of its first forward (fresh interpreter). GGUF and FP8 weights stay views of
    the file's mapping, so their pages become resident when the forward reads them."""
    import torch

    from flux2kit.pipelines.models.transformer import load_transformer

    meter = RssMeter()
    start = time.perf_counter()
    model = load_transformer(path, device="cpu")
    result = {"load_seconds": time.perf_counter() - start, "load_peak": meter.peak(), "load_anon": meter.anon_peak()}
    with torch.inference_mode():
        ours_forward(model, inputs(model.text_width, image_size, text_len))
    result.update(forward_peak=meter.peak(), forward_anon=meter.anon_peak())
    meter.stop()
    return result


# -- the main side ----------------------------------------------------------------------------------

def measure_memory(args, files: dict[str, str]) -> dict[str, dict]:
    script = os.path.abspath(__file__)
    cmd = lambda key: [script, "--measure-load", "--path", files[key], "--threads", str(args.threads),  # noqa: E731
                       "--image-size", str(args.image_size), "--text-len", str(args.text_len)]
    return run_measurements({k: cmd(k) for k in ("q8_0", "q4_k", "fp8")}, parallel=2 if args.quick else 1)


def time_forwards(args, files: dict[str, str], x: dict) -> tuple[Timings, dict]:
    import torch
    from diffusers import Flux2Transformer2DModel, GGUFQuantizationConfig

    from flux2kit.pipelines.models.transformer import load_transformer

    models = {name: load_transformer(files[key], device="cpu", dtype=torch.float32)
              for name, key in (("ours fp32", "bf16"), ("ours fp8", "fp8"), ("ours Q8_0", "q8_0"),
                                ("ours Q4_K", "q4_k"))}
    theirs = Flux2Transformer2DModel.from_single_file(
        files["q8_0"], config=os.path.join(os.path.dirname(files["q8_0"]), "config"), local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32)
    with torch.inference_mode():
        ref = ours_forward(models["ours fp32"], x)
        errors = {name: ((ours_forward(m, x) - ref).norm() / ref.norm()).item() for name, m in models.items()}
        q8 = ours_forward(models["ours Q8_0"], x)
        errors["diffusers Q8_0 vs ours Q8_0"] = ((diffusers_forward(theirs, x) - q8).abs().max() / q8.abs().max()).item()
        contenders = {name: (lambda m=m: ours_forward(m, x)) for name, m in models.items()}
        contenders["diffusers Q8_0"] = lambda: diffusers_forward(theirs, x)
        times = interleaved_times(contenders, runs=args.runs, progress=log)
    return times, errors


def time_dequantization(args) -> Timings:
    """One [dev] single-block linear2-sized layer (or smaller with --quick), two ways, per type."""
    import gguf
    import numpy as np
    import torch
    from diffusers.quantizers.gguf import utils

    from flux2kit.pipelines.demo_models.gguf import random_blocks
    from flux2kit.pipelines.files.gguf_quants import dequantize

    rows, cols = (256, 1024) if args.quick else (3072, 12288)
    contenders = {}
    for name in ("Q8_0", "Q4_K"):
        t = gguf.GGMLQuantizationType[name]
        packed = torch.from_numpy(random_blocks(t, rows, cols, np.random.default_rng(0)))
        param = utils.GGUFParameter(packed, quant_type=t)
        contenders[f"{name} ours (fp32 scales) -> bf16"] = lambda p=packed, t=t: dequantize(p, t, (rows, cols),
                                                                                          torch.bfloat16)
        contenders[f"{name} diffusers default (fp16) -> bf16"] = (
            lambda p=param: utils.dequantize_gguf_tensor(p).to(torch.bfloat16))
    return interleaved_times(contenders, runs=args.runs, progress=log)


def time_headers(workdir: str, runs: int, quick: bool) -> Timings:
    import gguf

    from flux2kit.pipelines.files.gguf import GGUFFile

    sizes = dict(tokens=8192, merges=16000) if quick else {}
    path = vocabulary_gguf(os.path.join(workdir, "vocabulary.gguf"), **sizes)
    return interleaved_times({"ours": lambda: GGUFFile(path).tensor("token_embd.weight"),
                              "gguf.GGUFReader": lambda: gguf.GGUFReader(path).tensors[0]},
                             runs=max(2, runs // 2), warmup=0, progress=log)


def run(args) -> tuple[list[Row], list[str]]:
    import torch

    from flux2kit.pipelines.demo_models.transformer import build_tiny_transformer

    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else dev_proportions(args.heads)
    log(f"building a random model: {config}")
    model = build_tiny_transformer(seed=0, **config)
    n_params = sum(p.numel() for p in model.parameters())
    x = inputs(config["joint_attention_dim"], args.image_size, args.text_len)
    workdir = args.workdir or tempfile.mkdtemp(prefix="flux2kit-bench-gguf-")
    os.makedirs(workdir, exist_ok=True)
    try:
        files = save_files(model, workdir)
        del model
        sizes = {k: os.path.getsize(p) for k, p in files.items()}
        log("files: " + ", ".join(f"{k} {gib(v)}" for k, v in sizes.items()))
        log("measuring RSS of each load in a fresh process ...")
        memory = measure_memory(args, files)
        log(f"timing forwards (load average {load_average()}) ...")
        times, errors = time_forwards(args, files, x)
        log("timing dequantization and header reading ...")
        dequant = time_dequantization(args)
        headers = time_headers(workdir, args.runs, args.quick)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    t = {k: times.median(k) for k in times}
    rows = [
        Row("model", f"{n_params / 1e9:.3f} B params, width {config['num_attention_heads'] * 128}, "
                     f"{config['num_layers']}+{config['num_single_layers']} blocks"),
        Row("tokens", f"{x['latents'].shape[1]} image ({args.image_size}px) + {x['text'].shape[1]} text"),
        Row(f"forward ours fp32 (median of {args.runs})", times.summary("ours fp32"), "1.000", "baseline"),
        Row("forward ours fp8 / ours fp32", times.summary("ours fp8"), ratio(t["ours fp8"], t["ours fp32"]), "context"),
        Row("forward ours Q8_0 / ours fp32", times.summary("ours Q8_0"), ratio(t["ours Q8_0"], t["ours fp32"]),
            "report"),
        Row("forward ours Q4_K / ours fp32", times.summary("ours Q4_K"), ratio(t["ours Q4_K"], t["ours fp32"]),
            "report"),
        Row("forward ours Q8_0 / ours fp8", "", ratio(t["ours Q8_0"], t["ours fp8"]), "report"),
        Row("forward diffusers Q8_0 / ours Q8_0", times.summary("diffusers Q8_0"),
            ratio(t["diffusers Q8_0"], t["ours Q8_0"]), "context (>= 1: ours no slower)"),
        Row("rounds with other processes busy: timed again / kept", f"{times.redone} / {times.contended}", "",
            "0 / 0 on a quiet machine"),
    ]
    for name in ("ours fp8", "ours Q8_0", "ours Q4_K"):
        rows.append(Row(f"relative error {name} vs ours fp32", f"{errors[name]:.2e}", "",
                        "random Q4_K blocks: not the model" if "Q4_K" in name else "report (rounding)"))
    rows.append(Row("max |diffusers Q8_0 - ours Q8_0| / max", f"{errors['diffusers Q8_0 vs ours Q8_0']:.2e}", "",
                    "~1e-4 (its fp16 dequantization)"))
    for kind in ("Q8_0", "Q4_K"):
        a, b = f"{kind} ours (fp32 scales) -> bf16", f"{kind} diffusers default (fp16) -> bf16"
        rows.append(Row(f"dequantize one layer {kind}: ours / diffusers default", dequant.summary(a),
                        ratio(dequant.median(a), dequant.median(b)), "<= ~1.2 (exact instead of fp16)"))
    rows.append(Row(f"read a {'8k' if args.quick else '131k'}-token GGUF header: ours / gguf.GGUFReader", headers.summary("ours"),
                    ratio(headers.median("ours"), headers.median("gguf.GGUFReader")), "<< 1"))
    for key, label in (("q8_0", "GGUF Q8_0"), ("q4_k", "GGUF Q4_K"), ("fp8", "FP8 (context)")):
        m = memory[key]
        anon = lambda n: "" if n is None else f", anon {gib(n)}"  # noqa: E731
        rows.append(Row(f"peak RSS {label}: load / file", f"{gib(m['load_peak'])}{anon(m['load_anon'])} "
                        f"({m['load_seconds']:.1f} s)", ratio(m["load_peak"], sizes[key]), "<= 1.1"))
        rows.append(Row(f"peak RSS {label}: load + 1st forward / file",
                        f"{gib(m['forward_peak'])}{anon(m['forward_anon'])}", ratio(m["forward_peak"], sizes[key]),
                        "report"))
    rows.append(Row("file size Q8_0 / Q4_K / fp8 / bf16",
                    " / ".join(gib(sizes[k]) for k in ("q8_0", "q4_k", "fp8", "bf16")),
                    f"{ratio(sizes['q8_0'], sizes['bf16'])} / {ratio(sizes['q4_k'], sizes['bf16'])} / "
                    f"{ratio(sizes['fp8'], sizes['bf16'])} / 1.000", ""))
    notes = []
    if times.contended:
        notes.append(f"WARNING: other processes kept the CPU busy during {times.contended} of the kept rounds; "
                     "these timings are not reliable. Run again on a quiet machine.")
    return rows, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_load:
        import torch

        torch.set_num_threads(args.threads)
        print_result(measure_load(args.path, args.image_size, args.text_len))
        return 0
    return print_report(f"GGUF forward{' (--quick)' if args.quick else ''}", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
