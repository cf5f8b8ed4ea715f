"""LoRAs on a FLUX.2 transformer forward (CPU): side branch vs merged vs no LoRA, and the memory of LoRA'd variants.

A random model of [dev] proportions (8 double + 48 single blocks, 128-wide heads; 6 heads by default,
~0.5B parameters) is saved as a ComfyUI FP8 file (``--weights bf16``: a BFL bf16 file, run in fp32), with
random LoRAs on every linear layer at rank 16 and 64. Contenders, timed interleaved in this process,
median of ``--runs``:

- no LoRA (the baseline);
- 1 and 3 LoRAs of rank 16 and of rank 64, as a side branch (``W x + s B(A x)`` per layer, weights untouched)
  and merged (the deltas added into FP8/fp32 weight copies once, before timing; the one-time merge is
  timed separately).

Memory, one fresh interpreter per scenario, after the same three forwards: the base alone, then the
growth from two FLUX.2 Load LoRA-style variants of that one base (different LoRAs, side branch), from a
merged variant, and from a copy of the base (what sharing avoids).

    python bench/lora_forward.py            # ~0.5B model, about 6 minutes on 2 quiet cores
    python bench/lora_forward.py --threads 1 --clock cpu   # on a busy shared machine: CPU time of one thread
    python bench/lora_forward.py --quick    # tiny smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import copy
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
from transformer_forward import QUICK, inputs, ours_forward

RANKS = (16, 64)
COUNTS = (1, 3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_forward_arguments(p, files='files')
    p.add_argument("--weights", choices=("fp8", "bf16"), default="fp8",
                   help="the base file: ComfyUI FP8 (kept FP8) or BFL bf16 (run in fp32)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time forwards by wall clock, or by this process's CPU time (for a busy shared machine; "
                        "best with --threads 1)")
    p.add_argument("--measure-memory", choices=SCENARIOS, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--loras", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.image_size, args.text_len = min(args.runs, 2), 64, 8
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def save_files(model, workdir: str, weights: str) -> dict:
    import torch

    from flux2kit.pipelines.demo_models import lora as demo
    from flux2kit.pipelines.demo_models.transformer import save_transformer

    layout = "comfy-fp8" if weights == "fp8" else "bfl"
    files = {"base": save_transformer(model, os.path.join(workdir, f"base-{layout}.safetensors"), layout)}
    for rank in RANKS:
        for i in range(max(COUNTS)):
            lora = demo.random_lora(dict(model.config), rank=rank, seed=100 * rank + i, std=0.01)
            files[f"r{rank}-{i}"] = demo.save_lora(lora, os.path.join(workdir, f"lora-r{rank}-{i}.safetensors"),
                                                   "bfl", alpha=float(rank), dtype=torch.bfloat16)
    return files


# -- the subprocess side: memory of variants on one base -------------------------------------------

SCENARIOS = ("base", "two variants", "merged variant", "copy of the base")


def measure_memory(scenario: str, path: str, loras: list[str], image_size: int, text_len: int) -> dict:
    """RSS (and its anonymous part) after three forwards in a fresh interpreter, in one of ``SCENARIOS``:
    the base three times; base, variant A, variant B (two FLUX.2 Load LoRA nodes on one base); base and a
    merged variant twice; base and a deep copy of the base twice (what a variant would cost without sharing).
    The same forwards everywhere, so the differences are what each scenario keeps."""
    import torch

    from flux2kit.pipelines.files.lora_formats import read_lora
    from flux2kit.pipelines.models.lora import LoraEntry, apply_loras
    from flux2kit.pipelines.models.transformer import load_transformer

    meter = RssMeter()
    base = load_transformer(path, device="cpu")
    files = [read_lora(p) for p in loras[:2]] if scenario != "base" else []
    if scenario == "two variants":
        runs = [base] + [apply_loras(base, [LoraEntry(f, 0.8)]) for f in files]
    elif scenario == "merged variant":
        runs = [base] + 2 * [apply_loras(base, [LoraEntry(files[0], 0.8, merge=True)])]
    elif scenario == "copy of the base":
        twin = copy.copy(base)
        twin.model = copy.deepcopy(base.model)
        runs = [base, twin, twin]
    else:
        runs = [base] * 3
    x = inputs(base.text_width, image_size, text_len)
    with torch.inference_mode():
        for t in runs:
            ours_forward(t, x)
    _release_free_heap()
    result = {"resident": meter.resident(), "anon": _anon(meter), "files": sum(f.nbytes for f in files)}
    meter.stop()
    return result


def _release_free_heap() -> None:
    """glibc keeps freed mid-sized blocks (a layer's temporary fp32 weight) in its heap; give them back, so
    RSS counts what is alive, not what the allocator kept (no-op without glibc)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _anon(meter) -> int | None:
    """Anonymous resident memory grown since ``meter`` started (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            now = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None
    return None if meter.anon_base is None else now - meter.anon_base


# -- the main side ----------------------------------------------------------------------------------

def time_forwards(args, files: dict, x: dict):
    import torch

    from flux2kit.pipelines.files.lora_formats import read_lora
    from flux2kit.pipelines.models.lora import LoraEntry, apply_loras
    from flux2kit.pipelines.models.transformer import load_transformer

    base = load_transformer(files["base"], device="cpu")
    contenders, merge_seconds, errors = {"no LoRA": base}, {}, {}
    with torch.inference_mode():
        reference = ours_forward(base, x)
        for rank in RANKS:
            for n in COUNTS:
                entries = [LoraEntry(read_lora(files[f"r{rank}-{i}"]), 0.8) for i in range(n)]
                side = apply_loras(base, entries)
                merged = apply_loras(base, [LoraEntry(e.lora, e.strength, merge=True) for e in entries])
                start = time.perf_counter()
                merged.merged.make(base.model)
                merge_seconds[(rank, n)] = time.perf_counter() - start
                a, b = ours_forward(side, x), ours_forward(merged, x)
                errors[(rank, n)] = (((b - a).norm() / a.norm()).item(), ((a - reference).norm() / reference.norm()).item())
                contenders[f"{n} x rank {rank}, side branch"] = side
                contenders[f"{n} x rank {rank}, merged"] = merged
        cpu: dict[str, list[float]] = {name: [] for name in contenders}

        def timed(name, t):
            def call():
                start = time.process_time()
                ours_forward(t, x)
                cpu[name].append(time.process_time() - start)
            return call

        # --clock cpu: this process's CPU seconds (all its threads), which other processes on a shared
        # machine do not inflate the way they inflate wall time; no round is timed again for them.
        times = interleaved_times({name: timed(name, t) for name, t in contenders.items()}, runs=args.runs,
                                  progress=log, max_foreign=1e9 if args.clock == "cpu" else 0.25)
    if args.clock == "cpu":
        times = Timings({name: values[-args.runs:] for name, values in cpu.items()}, times.redone, times.contended)
    return times, merge_seconds, errors


def run(args):
    import torch

    from flux2kit.pipelines.demo_models.transformer import build_tiny_transformer

    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else dev_proportions(args.heads)
    log(f"building a random model: {config}")
    model = build_tiny_transformer(seed=0, **config)
    n_params = sum(p.numel() for p in model.parameters())
    x = inputs(config["joint_attention_dim"], args.image_size, args.text_len)
    workdir = args.workdir or tempfile.mkdtemp(prefix="flux2kit-bench-lora-")
    os.makedirs(workdir, exist_ok=True)
    try:
        files = save_files(model, workdir, args.weights)
        del model
        log("measuring the memory of LoRA'd variants, one fresh process per scenario ...")
        script = os.path.abspath(__file__)
        memory = run_measurements({name: [script, "--measure-memory", name, "--path", files["base"], "--threads",
                                          str(args.threads), "--image-size", str(args.image_size), "--text-len",
                                          str(args.text_len), "--loras", files["r16-0"], files["r16-1"]]
                                   for name in SCENARIOS})
        log(f"timing forwards (load average {load_average()}) ...")
        times, merge_seconds, errors = time_forwards(args, files, x)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    t = {k: times.median(k) for k in times}
    rows = [
        Row("model", f"{n_params / 1e9:.3f} B params, width {config['num_attention_heads'] * 128}, "
                     f"{config['num_layers']}+{config['num_single_layers']} blocks, {args.weights} file"),
        Row("tokens", f"{x['latents'].shape[1]} image ({args.image_size}px) + {x['text'].shape[1]} text"),
        Row(f"forward, no LoRA ({args.clock} time, median of {args.runs})", times.summary("no LoRA"), "1.000",
            "baseline"),
    ]
    for rank in RANKS:
        for n in COUNTS:
            for mode in ("side branch", "merged"):
                name = f"{n} x rank {rank}, {mode}"
                target = "report" if mode == "merged" else ("<= 1.10" if rank == 16 and n == 1 else "report")
                rows.append(Row(f"forward, {name} / no LoRA", times.summary(name), ratio(t[name], t["no LoRA"]),
                                target))
            rows.append(Row(f"one-time merge of {n} x rank {rank} / one forward without",
                            f"{merge_seconds[(rank, n)]:.3f} s", ratio(merge_seconds[(rank, n)], t["no LoRA"]),
                            "report"))
            merged_err, effect = errors[(rank, n)]
            rows.append(Row(f"{n} x rank {rank}: merged vs side branch, relative", f"{merged_err:.2e}", "",
                            f"LoRA effect {effect:.2e}"))
    rows += [
        Row("rounds with other processes busy: timed again / kept", f"{times.redone} / {times.contended}", "",
            "0 / 0 on a quiet machine"),
        Row("RSS after 3 forwards, the base alone", _mem(memory["base"]), "1.000", "baseline"),
    ]
    base_rss = memory["base"]["resident"]
    for name, target in (("two variants", f"~ the two LoRAs ({gib(memory['two variants']['files'])} as read)"),
                         ("merged variant", "~ the merged layers' weights"),
                         ("copy of the base", "what sharing saves per variant")):
        grown = memory[name]["resident"] - base_rss
        rows.append(Row(f"RSS growth: {name} / the base", f"{gib(grown)} ({_mem(memory[name])})",
                        ratio(grown, base_rss), target))
    notes = []
    if times.contended:
        notes.append(f"WARNING: other processes kept the CPU busy during {times.contended} of the kept rounds; "
                     "these timings are not reliable. Run again on a quiet machine.")
    return rows, notes


def _mem(m: dict) -> str:
    anon = "" if m.get("anon") is None else f", anon {gib(m['anon'])}"
    return f"{gib(m['resident'])}{anon}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_memory:
        import torch

        torch.set_num_threads(args.threads)
        print_result(measure_memory(args.measure_memory, args.path, args.loras, args.image_size, args.text_len))
        return 0
    return print_report(f"LoRA forward{' (--quick)' if args.quick else ''}, {args.clock} clock", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
