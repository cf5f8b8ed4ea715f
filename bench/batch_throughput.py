"""``flux2kit batch`` throughput: jobs per minute with 1, 2 and 3 servers, and the dispatcher's own cost per job.

Servers: ``flux2kit.testing.fake_comfyui`` processes speaking ComfyUI's protocol, each running flux2kit's
nodes on the tiny demo models with ONE torch thread (``text_to_image``, ``--size``, ``--steps``; the
prompt is the same for every job and the seed changes, like a seed sweep, so each job runs the
sampler, the decoder and the save). On a machine with C cores the ceiling is about min(servers, C)
times the 1-server rate. The dispatcher runs in this process (``batch_command``, the same code as
the command line), timed from its first submission to its summary.

Next to each rate: the share of the batch's time the servers spent running a job (near 1.0: the
dispatcher never let them wait) and the mean time of one job run on a server. When the ratio stays
below the core count while the share is near 1.0, the runs themselves got slower: the CPU is
shared (by the servers, or by other work on the machine), and the dispatcher is not the limit.

The dispatcher's own cost is measured separately against ``--instant`` servers, which answer every
prompt with a fixed 8x8 PNG without running a model: wall time per job (submit, poll, fetch, write
image + sidecar, SQLite commits) and this process's CPU time per job.

    python bench/batch_throughput.py             # 3 + 3 servers, 3 interleaved rounds; a few minutes
    python bench/batch_throughput.py --quick     # fewer jobs, 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

# _common is a sibling: `python bench/<script>.py` puts bench/ on sys.path
from _common import Row, load_average, ratio, table

HERE = os.path.dirname(os.path.abspath(__file__))

DEMO_NAMES = ["Flux2KitTransformerLoader.model_name=flux2_dev_tiny_fp8mixed.safetensors",
              "Flux2KitTextEncoderLoader.text_encoder_name=mistral_3_small_tiny/",
              "Flux2KitVAELoader.vae_name=flux2-vae-tiny.safetensors"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=24, help="jobs per timed batch on the model servers")
    p.add_argument("--instant-jobs", type=int, default=60, help="jobs per timed batch on the instant servers")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--size", type=int, default=64, help="square image side")
    p.add_argument("--steps", type=int, default=2, help="sampling steps")
    p.add_argument("--per-server", type=int, default=2, help="--per-server of the batch")
    p.add_argument("--workdir", help="keep servers' folders and outputs here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="8 jobs (20 instant), 1 round: checks the script works")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.instant_jobs, args.runs = 8, 20, 1
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_batch(workflow: str, out: str, urls: list[str], jobs: int, args, seed0: int) -> tuple[float, float]:
    """(seconds from the first submission to the summary, this process's CPU seconds) for one batch."""
    from flux2kit.cli.batch import batch_command
    from flux2kit.cli import build_parser

    argv = ["batch", workflow, "--out", out, "--sweep", f"seed={seed0}..{seed0 + jobs - 1}",
            "--per-server", str(args.per_server), "--set", f"size={args.size}x{args.size}",
            "--set", f"steps={args.steps}", "--set", "prompt=a lighthouse at dusk"]
    for setting in DEMO_NAMES:
        argv += ["--set", setting]
    for url in urls:
        argv += ["--server", url]
    parsed = build_parser().parse_args(argv)
    cpu = os.times()
    with contextlib.redirect_stderr(io.StringIO()):
        summary = batch_command(parsed)
    cpu_after = os.times()
    if summary["done"] != jobs:
        raise RuntimeError(f"batch finished {summary['done']} of {jobs} jobs: {json.dumps(summary)[:2000]}")
    return summary["seconds"], (cpu_after.user - cpu.user) + (cpu_after.system - cpu.system)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flux2kit.testing.fake_comfyui import start_servers

    repo = os.path.dirname(HERE)
    workflow = os.path.join(repo, "workflows", "api", "text_to_image.json")
    work = args.workdir or tempfile.mkdtemp(prefix="flux2kit-batch-bench-")
    os.makedirs(work, exist_ok=True)
    servers = []
    try:
        log("starting 3 model servers and 3 instant servers (one torch thread each)...")
        start = time.monotonic()
        servers = start_servers(3, os.path.join(work, "model"), os.path.join(work, "models"))
        servers += start_servers(3, os.path.join(work, "instant"), os.path.join(work, "models"), instant=True)
        log(f"  ready in {time.monotonic() - start:.0f} s")
        model_urls = [s.url for s in servers[:3]]
        instant_urls = [s.url for s in servers[3:]]
        counter = iter(range(1_000_000))

        def batch(urls, jobs):
            n = next(counter)
            return run_batch(workflow, os.path.join(work, "out", f"b{n:03d}"), urls, jobs, args, seed0=n * 10_000)

        def server_side(used, since: float, seconds: float) -> tuple[float, float]:
            """(share of the batch's time the servers were running a job, mean seconds per job run)."""
            runs = []
            for s in used:
                events = [e for e in s.executions() if e["time"] >= since]
                starts = {e["prompt_id"]: e["time"] for e in events if e["event"] == "start"}
                runs += [e["time"] - starts[e["prompt_id"]] for e in events
                         if e["event"] == "done" and e["prompt_id"] in starts]
            return sum(runs) / (seconds * len(used)), statistics.mean(runs)

        log("warm-up: every model server loads the models once")
        batch(model_urls, 2 * len(model_urls))
        batch(instant_urls, 6)
        configs = {1: model_urls[:1], 2: model_urls[:2], 3: model_urls}
        rates: dict[int, list[float]] = {n: [] for n in configs}
        busy: dict[int, list[tuple[float, float]]] = {n: [] for n in configs}
        for r in range(args.runs):
            order = list(configs)[r % 3:] + list(configs)[:r % 3]
            for n in order:
                since = time.time()
                seconds, _ = batch(configs[n], args.jobs)
                rates[n].append(args.jobs / seconds * 60)
                busy[n].append(server_side(servers[:n], since, seconds))
                log(f"  round {r + 1}/{args.runs}: {n} server(s): {rates[n][-1]:.1f} jobs/min, servers busy "
                    f"{busy[n][-1][0]:.2f}, {busy[n][-1][1]:.3f} s per job run (load {load_average()})")
        overhead: dict[int, list[tuple[float, float]]] = {1: [], 3: []}
        for r in range(args.runs):
            for n in ((1, 3) if r % 2 == 0 else (3, 1)):
                seconds, cpu = batch(instant_urls[:n], args.instant_jobs)
                overhead[n].append((seconds / args.instant_jobs, cpu / args.instant_jobs))
                log(f"  round {r + 1}/{args.runs}: instant x{n}: {1000 * overhead[n][-1][0]:.1f} ms/job wall, "
                    f"{1000 * overhead[n][-1][1]:.1f} ms/job CPU")
    finally:
        for s in servers:
            s.kill()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    med = {n: statistics.median(v) for n, v in rates.items()}
    spread = {n: f"(min {min(v):.1f}, max {max(v):.1f})" for n, v in rates.items()}
    rows = [Row(f"{n} server{'s' if n > 1 else ''}: jobs/min", f"{med[n]:.1f} {spread[n]}", ratio(med[n], med[1]),
                "baseline" if n == 1 else f"<= {min(n, os.cpu_count() or 1)}.0 (cores)") for n in configs]
    for n in configs:  # why the ratio is what it is: idle servers (the dispatcher) or slower runs (the CPU)
        share = statistics.median(b[0] for b in busy[n])
        run = statistics.median(b[1] for b in busy[n])
        rows.append(Row(f"{n} server{'s' if n > 1 else ''}: share of time running a job / s per job run",
                        f"{share:.2f} / {run:.3f} s", ratio(run, statistics.median(b[1] for b in busy[1])),
                        "share ~1.0 (never idle)"))
    for n, values in overhead.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        rows.append(Row(f"dispatcher, instant server{'s' if n > 1 else ''} x{n}: wall / job",
                        f"{1000 * wall:.1f} ms", "", "report"))
        rows.append(Row(f"dispatcher, instant server{'s' if n > 1 else ''} x{n}: own CPU / job",
                        f"{1000 * cpu:.1f} ms", "", "report"))
    per_job = 60 / med[1]
    rows.append(Row("dispatcher CPU / one tiny-model job (1 server)",
                    f"{1000 * statistics.median(v[1] for v in overhead[1]):.1f} ms / {1000 * per_job:.0f} ms",
                    ratio(statistics.median(v[1] for v in overhead[1]), per_job), "small"))
    print(f"flux2kit batch: text_to_image on the tiny demo models, {args.size}x{args.size}, {args.steps} steps, "
          f"{args.jobs} jobs per batch ({args.instant_jobs} on instant servers), --per-server {args.per_server}, "
          f"median of {args.runs}; one torch thread per server")
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average now {load_average()} "
          "(other processes on the machine slow the servers: the ratios are what to read)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
