"""What every bench script shares: interleaved median timing, memory in a fresh process, a table.

Bench scripts compare contenders run in the same invocation and print ratios, so the numbers
survive a different machine; nothing here decides pass or fail.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

GIB = 1024 ** 3
_RESULT_TAG = "BENCH-RESULT "


# -- timing ---------------------------------------------------------------------------------------

class Timings(dict):
    """name -> seconds per call of each contender, plus how many rounds other processes disturbed."""

    def __init__(self, times: dict[str, list[float]], redone: int = 0, contended: int = 0):
        super().__init__(times)
        self.redone = redone  # rounds discarded because other processes took CPU during them
        self.contended = contended  # disturbed rounds kept (no redos left): treat the numbers with care

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def summary(self, name: str) -> str:
        t = self[name]
        return f"{statistics.median(t):.3f} s (min {min(t):.3f}, max {max(t):.3f})"


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def interleaved_times(contenders: dict[str, Callable[[], object]], *, runs: int, warmup: int = 1,
                      max_foreign: float = 0.25, progress: Callable[[str], None] | None = None) -> Timings:
    """Time each contender ``runs`` times, round by round (A B C, B C A, ...), after ``warmup`` rounds.

    Interleaving spreads slow drift over all contenders. A burst of other work is worse: with every
    core busy, torch's threads wait on each other and one call can take several times longer. So a
    round in which other processes used more than ``max_foreign`` of a core (during any call of at
    least 0.5 s; Linux only) is timed again, at most ``runs`` times in all.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    redone = contended = rounds = 0
    while len(times[names[0]]) < runs:
        this_round, foreign = {}, 0.0
        # Each round starts one contender later (A B C, B C A, ...): none always follows the same one.
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            fn = contenders[name]
            gc.collect()
            busy, own, start = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if busy is not None and elapsed >= 0.5:
                others = (_machine_busy_seconds() - busy) - (_own_cpu_seconds() - own)
                foreign = max(foreign, others / elapsed)
            this_round[name] = elapsed
            if progress:
                kind = "warm-up" if rounds < warmup else f"run {len(times[name]) + 1}/{runs}"
                progress(f"{kind:>10}  {name}: {elapsed:.3f} s")
        rounds += 1
        if rounds <= warmup:
            continue
        if foreign > max_foreign:
            if redone < runs:
                redone += 1
                if progress:
                    progress(f"  other processes used {foreign:.2f} cores during this round; timing it again")
                continue
            contended += 1
        for name, elapsed in this_round.items():
            times[name].append(elapsed)
    return Timings(times, redone, contended)


def contention_report(times: Timings) -> tuple["Row", list[str]]:
    """The table row saying how many rounds other processes disturbed (timed again / kept anyway), and a
    warning note when disturbed rounds had to be kept. Every script that times prints both."""
    row = Row("rounds with other processes busy: timed again / kept", f"{times.redone} / {times.contended}", "",
              "0 / 0 on a quiet machine")
    notes = []
    if times.contended:
        notes.append(f"WARNING: other processes kept the CPU busy during {times.contended} of the kept rounds; "
                     "these timings are not reliable. Run again on a quiet machine.")
    return row, notes


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- memory ---------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the peak, the best the platform offers)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since ``reset_peak_rss`` (or since it started).

    Linux: ``VmHWM``. Not ``ru_maxrss``, which after fork+exec also remembers the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Start the peak over from the current RSS (Linux >= 4.0); False where that is not possible.

    Without it, a transient peak during imports could hide below the baseline taken after them.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssMeter:
    """RSS growth from the moment it is made: ``peak()`` since then, ``resident()`` now.

    Meant for a fresh process (``run_measurements``): the baseline is that process after its imports.
    safetensors maps files, so RSS also counts the file's pages once read; those are clean page
    cache the kernel can drop. ``anon_peak()`` is the part it cannot (sampled every 5 ms, Linux).
    """

    def __init__(self):
        gc.collect()
        reset_peak_rss()
        self.base = rss_bytes()
        self.anon_base = _status_bytes("RssAnon")
        self._anon_max = self.anon_base or 0
        self._stop = threading.Event()
        self._thread = None
        if self.anon_base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._anon_max = max(self._anon_max, _status_bytes("RssAnon") or 0)

    def peak(self) -> int:
        return peak_rss_bytes() - self.base

    def anon_peak(self) -> int | None:
        if self.anon_base is None:
            return None
        self._anon_max = max(self._anon_max, _status_bytes("RssAnon") or 0)
        return self._anon_max - self.anon_base

    def resident(self) -> int:
        gc.collect()
        return rss_bytes() - self.base

    def stop(self) -> None:
        self._stop.set()


def print_result(result: dict) -> None:
    """How a measurement subprocess hands its dict back to ``run_measurement``."""
    print(_RESULT_TAG + json.dumps(result), flush=True)


def run_measurements(commands: dict[str, list[str]], *, parallel: int = 1) -> dict[str, dict]:
    """Run each command (a Python argv that ends in ``print_result``) in a fresh interpreter.

    Memory is per process, so running ``parallel`` at a time changes no number, only the wall time.
    """
    results: dict[str, dict] = {}
    pending = list(commands.items())
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < max(1, parallel):
            name, argv = pending.pop(0)
            running.append((name, subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True)))
        name, proc = running.pop(0)
        out, err = proc.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith(_RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"measurement {name!r} failed (exit {proc.returncode}):\n{err[-3000:]}")
        results[name] = json.loads(lines[-1][len(_RESULT_TAG):])
    return results


# -- reporting ------------------------------------------------------------------------------------

@dataclass
class Row:
    measurement: str
    value: str
    ratio: str = ""
    target: str = ""


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def gib(n: float) -> str:
    return f"{n / GIB:.3f} GiB"


def table(rows: list[Row], headers=("measurement", "value", "ratio", "target")) -> str:
    """A plain-text (Markdown) table; columns padded so it reads in a terminal too."""
    cells = [list(headers)] + [[r.measurement, r.value, r.ratio, r.target] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    line = lambda c: "| " + " | ".join(s.ljust(w) for s, w in zip(c, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(c) for c in cells[1:]])


def machine_facts() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu}), "
            f"python {platform.python_version()}, {platform.system()}, load average {load_average()}")


def load_average() -> str:
    """The 1-minute load average: other processes on the machine make every timing noisier."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


# -- models ---------------------------------------------------------------------------------------

def dev_proportions(heads: int, *, text_width: int | None = None) -> dict:
    """FLUX.2 [dev]'s shape (8 double + 48 single blocks, 128-wide heads, guidance) at ``heads`` heads.

    [dev] has 48 heads (width 6144) and text width 15360; 6 heads gives ~0.5B parameters.
    """
    width = heads * 128
    return dict(num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=heads,
                joint_attention_dim=text_width or 3 * width, guidance_embeds=True)


def add_forward_arguments(p: argparse.ArgumentParser, *, files: str = "model files") -> None:
    """The arguments every transformer-forward benchmark takes (model size, inputs, threads, rounds)."""
    p.add_argument("--runs", type=int, default=5, help="timed forwards per contender (median reported)")
    p.add_argument("--heads", type=int, default=6, help="attention heads of 128; 6 -> width 768, ~0.5B params")
    p.add_argument("--image-size", type=int, default=256, help="square image side in pixels; 16 px per token")
    p.add_argument("--text-len", type=int, default=128, help="text tokens (the real model uses 512)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--workdir", help=f"where the {files} go (default: a temporary folder, removed after)")
    p.add_argument("--quick", action="store_true", help="tiny model and inputs, 2 runs: checks the script works")


def print_report(title: str, run: Callable[[], tuple[list["Row"], list[str]]]) -> int:
    """Run the measurements, then print the machine, the table, the notes and the total time."""
    start = time.perf_counter()
    rows, notes = run()
    print(f"# {title}: {machine_facts()}")
    print(table(rows))
    for note in notes:
        print(f"# {note}")
    print(f"# total {time.perf_counter() - start:.0f} s")
    return 0
