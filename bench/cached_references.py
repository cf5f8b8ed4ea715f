"""Cached references: sampling with 2 references, cached vs uncached, per step and whole run, and the cache's memory.

A random [klein]-shaped transformer (tiny by default: 2 double + 2 single blocks, 2 heads of 128) runs
``--steps`` steps at ``--size`` x ``--size`` with two references of the same size and a 512-token prompt
(the length FLUX.2 always uses), fp32 on the CPU, timed interleaved in this process (median of ``--runs``):

- **KV model** (``reference_cache`` off / auto): the same weights loaded as FLUX.2 [klein] 9B KV. Off
  recomputes the references at every step (their self-attending pass, as diffusers' KV pipeline does
  without a cache); auto computes their K/V at the first step and reuses them; "auto, reused" starts
  with the K/V kept from an earlier run (only prompt/seed changed), so no step sees the references.
- **Approximate** (ComfyUI's FluxKVCache, any model): the plain [klein] with its references appended at
  every step vs the approximation; and how much the approximation changes the picture.

Per-step times come from the sampler's step callback; "after the first" is the median of steps 2..N.

    python bench/cached_references.py            # 512x512, 4 steps, 3 runs: about 3 minutes on 2 cores
    python bench/cached_references.py --quick    # 128x128, 2 steps, 1 run: checks the script works
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# _common is a sibling: `python bench/<script>.py` puts bench/ on sys.path
from _common import Row, interleaved_times, machine_facts, ratio, table

# Real models (docs/checkpoints.md): (double, single) blocks and width, for the cache-memory rows.
REAL = {"[klein] 4B": (5, 20, 3072), "[klein] 9B": (8, 24, 4096), "[dev]": (8, 48, 6144)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="timed runs per contender (median reported)")
    p.add_argument("--size", type=int, default=512, help="image and reference side in pixels")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per run")
    p.add_argument("--heads", type=int, default=2, help="attention heads of 128 (2: the tiny test model)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="128x128, 2 steps, 1 run: checks the script works")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.size, args.steps = 1, 128, 2
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StepClock:
    """The sampler's step callback: the wall time and this process's CPU time each step took.

    CPU time counts the work done and hardly moves when other processes share the machine; wall time
    is what a user waits (on a quiet machine the two keep the same ratios).
    """

    def __init__(self):
        self.last, self.last_cpu, self.steps, self.cpu = time.perf_counter(), time.process_time(), [], []

    def __call__(self, step, total, latents) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.steps.append(now - self.last)
        self.cpu.append(cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from flux2kit.pipelines.demo_models.transformer import build_tiny_klein, save_transformer
    from flux2kit.pipelines.demo_models.vae import build_tiny_vae, save_vae_ldm
    from flux2kit.pipelines.generation.generate import decode, sample
    from flux2kit.pipelines.generation.references import latent_references
    from flux2kit.pipelines.models.reference_kv import bytes_per_token
    from flux2kit.pipelines.models.transformer import load_transformer
    from flux2kit.pipelines.models.vae import load_vae

    torch.set_num_threads(args.threads)
    log(machine_facts())
    with tempfile.TemporaryDirectory(prefix="flux2kit-bench-") as tmp:
        model = build_tiny_klein(seed=0, size="9b", num_attention_heads=args.heads)
        path = save_transformer(model, os.path.join(tmp, "klein.safetensors"), "bfl")
        kv = load_transformer(path, device="cpu", klein_mode="kv")
        plain = load_transformer(path, device="cpu", klein_mode="distilled")
        vae = load_vae(save_vae_ldm(build_tiny_vae(seed=0), os.path.join(tmp, "vae.safetensors")), device="cpu")
    g = torch.Generator().manual_seed(0)
    side = args.size // 16
    refs = latent_references([torch.randn(1, 128, side, side, generator=g) for _ in range(2)])
    embeds = torch.randn(1, 512, kv.text_width, generator=g)
    step_times: dict[str, list[float]] = {}
    step_cpu: dict[str, list[float]] = {}

    def run(transformer, mode, name, *, keep_cache=False, seed=1):
        def call():
            if not keep_cache:
                transformer.caches.clear()
            clock = StepClock()
            out = sample(transformer, embeds, refs, width=args.size, height=args.size,
                         num_inference_steps=args.steps, guidance=1.0, seed=seed, reference_cache=mode,
                         callback=clock)
            step_times.setdefault(name, []).append(clock.steps)
            step_cpu.setdefault(name, []).append(clock.cpu)
            return out
        return call

    # "auto, reused": the cache of an earlier run with the same references (another seed) is there already.
    run(kv, "auto", "warm", keep_cache=True, seed=99)()
    contenders = {
        "KV model, off": run(kv, "off", "KV model, off"),
        "KV model, auto": run(kv, "auto", "KV model, auto"),
        "KV model, auto, reused": run(kv, "auto", "KV model, auto, reused", keep_cache=True),
        "plain, uncached": run(plain, "auto", "plain, uncached"),
        "plain, approximate": run(plain, "approximate", "plain, approximate"),
    }
    for name in step_times:
        step_times[name].clear()
        step_cpu[name].clear()
    timings = interleaved_times(contenders, runs=args.runs, warmup=1, progress=log)
    first = {n: statistics.median(s[0] for s in step_times[n][-args.runs:]) for n in contenders}
    later = {n: statistics.median(t for s in step_times[n][-args.runs:] for t in s[1:]) for n in contenders}
    later_cpu = {n: statistics.median(t for s in step_cpu[n][-args.runs:] for t in s[1:]) for n in contenders}
    run_cpu = {n: statistics.median(sum(s) for s in step_cpu[n][-args.runs:]) for n in contenders}

    # Memory: the cache the KV model keeps (exact tensor bytes), and the same formula for the real models.
    kv.caches.clear()
    run(kv, "auto", "memory", keep_cache=True)()
    (cache,) = kv.caches["reference_kv"].values()
    from flux2kit.pipelines.models.reference_kv import cache_bytes

    held = cache_bytes(cache)
    # The approximation's effect on the picture, against the references' own effect (decoded, [0, 1] pixels).
    pictures = {mode: decode(vae, sample(plain, embeds, refs if mode != "no refs" else None, width=args.size,
                                         height=args.size, num_inference_steps=args.steps, guidance=1.0, seed=1,
                                         reference_cache="off" if mode == "no refs" else mode))
                for mode in ("off", "approximate", "no refs")}
    approx_diff = (pictures["approximate"] - pictures["off"]).abs()
    refs_diff = (pictures["no refs"] - pictures["off"]).abs()

    rows = [
        Row("per step after the first, CPU time: KV model off / auto", f"{later_cpu['KV model, off']:.3f} s / "
            f"{later_cpu['KV model, auto']:.3f} s", ratio(later_cpu["KV model, off"], later_cpu["KV model, auto"]),
            ">= 1.8"),
        Row("per step after the first, wall time: KV model off / auto", f"{later['KV model, off']:.3f} s / "
            f"{later['KV model, auto']:.3f} s", ratio(later["KV model, off"], later["KV model, auto"]), ">= 1.8"),
        Row("first step: KV model auto (extracts) / off", f"{first['KV model, auto']:.3f} s / "
            f"{first['KV model, off']:.3f} s", ratio(first["KV model, auto"], first["KV model, off"]), "about 1"),
        Row("whole run, CPU time: KV model off / auto / auto with the cache of an earlier run",
            f"{run_cpu['KV model, off']:.2f} s / {run_cpu['KV model, auto']:.2f} s / "
            f"{run_cpu['KV model, auto, reused']:.2f} s",
            f"{ratio(run_cpu['KV model, off'], run_cpu['KV model, auto'])} / "
            f"{ratio(run_cpu['KV model, off'], run_cpu['KV model, auto, reused'])}", "report"),
        Row("whole run: KV model off / auto", f"{timings.summary('KV model, off')} / "
            f"{timings.summary('KV model, auto')}", ratio(timings.median("KV model, off"),
                                                          timings.median("KV model, auto")), "report"),
        Row("whole run: KV model off / auto with the cache of an earlier run",
            timings.summary("KV model, auto, reused"), ratio(timings.median("KV model, off"),
                                                             timings.median("KV model, auto, reused")), "report"),
        Row("per step after the first, CPU time: plain uncached / approximate",
            f"{later_cpu['plain, uncached']:.3f} s / {later_cpu['plain, approximate']:.3f} s",
            ratio(later_cpu["plain, uncached"], later_cpu["plain, approximate"]), "report"),
        Row("whole run: plain uncached / approximate", timings.summary("plain, approximate"),
            ratio(timings.median("plain, uncached"), timings.median("plain, approximate")), "report"),
        Row("approximate vs uncached picture: mean / max |diff| ([0, 1] pixels)",
            f"{approx_diff.mean().item():.2e} / {approx_diff.max().item():.2e}",
            ratio(approx_diff.mean().item(), refs_diff.mean().item()), "ratio: of the references' own effect"),
        Row(f"cache memory, this model ({refs.num_tokens} reference tokens)", f"{held / 2**20:.1f} MiB",
            ratio(held, refs.num_tokens * bytes_per_token(kv.model, kv.dtype)), "1.000 (formula)"),
    ]
    for name, (double, single, width) in REAL.items():
        per_token = 2 * width * (double + single) * 2  # K and V, every block, bf16
        rows.append(Row(f"cache memory, {name} bf16: per token / per 1 MP reference (4096 tokens)",
                        f"{per_token / 2**20:.2f} MiB / {per_token * 4096 / 2**30:.2f} GiB"))
    print(f"\n{args.size}x{args.size}, 2 references of the same size, 512 text tokens, {args.steps} steps, "
          f"{args.heads} heads x 128, fp32 on the CPU; median of {args.runs} interleaved runs"
          + (f" ({timings.redone} rounds timed again)" if timings.redone else "") + "\n")
    print(table(rows))
    if timings.contended:
        print(f"\nWARNING: {timings.contended} rounds ran while other processes were busy; numbers are noisy.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
