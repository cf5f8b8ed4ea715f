"""``flux2kit batch`` against TWO real ComfyUI servers (``COMFYUI_PATH``): killed with SIGKILL mid-run, resumed.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout (see DEVELOPERS.md). Run with
``COMFYUI_PATH=... pytest -m comfyui tests/cli/test_real_comfyui_batch.py -s`` to see the numbers.
Executions are counted from the servers' own ``/history``: each entry carries the batch and job in
``extra_data.flux2kit_batch``, so a job submitted twice would show twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import pytest

from flux2kit.testing.real_comfyui import ComfyUISetupError, comfyui_path, comfyui_server

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="COMFYUI_PATH is not set (a ComfyUI checkout; see DEVELOPERS.md)"),
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS = 16


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set")
    root = tmp_path_factory.mktemp("comfyui_pair")
    with contextlib.ExitStack() as stack:
        try:
            first = stack.enter_context(comfyui_server(root / "a"))
            second = stack.enter_context(comfyui_server(root / "b"))
        except ComfyUISetupError as e:  # COMFYUI_PATH is set: a broken setup fails, with what to fix
            pytest.fail(f"COMFYUI_PATH is set, but the real-ComfyUI tests cannot run: {e}", pytrace=False)
        assert first.port != second.port and first.root != second.root
        yield first, second


def _manifest(out):
    db = sqlite3.connect(os.path.join(out, "batch.sqlite"))
    try:
        jobs = {r[0]: {"state": r[1], "attempts": r[2], "outputs": json.loads(r[3] or "[]"), "target": r[4]}
                for r in db.execute("SELECT job, state, attempts, outputs, target FROM jobs")}
        row = db.execute("SELECT value FROM meta WHERE key = 'batch_id'").fetchone()
        bid = json.loads(row[0]) if row else None  # None while the first run is still writing its header
        return jobs, bid
    finally:
        db.close()


def test_batch_killed_and_resumed_on_two_real_servers(two_servers, tmp_path):
    a, b = two_servers
    names = a.model_names
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"a paper boat {i}", "seed": 100 + i}) + "\n" for i in range(JOBS)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flux2kit.cli", "batch", os.path.join(REPO, "workflows", "text_to_image.json"),
           str(rows), "--out", str(out), "--server", a.url, "--server", b.url, "--per-server", "2",
           "--set", "size=64x64", "--set", "steps=1",
           "--set", f"Flux2KitTransformerLoader.model_name={names['transformer']}",
           "--set", f"Flux2KitTextEncoderLoader.text_encoder_name={names['text_encoder']}",
           "--set", f"Flux2KitVAELoader.vae_name={names['vae']}"]  # the UI workflow: converted via /object_info
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 300
    while True:
        time.sleep(0.1)
        if os.path.exists(out / "batch.sqlite"):
            with contextlib.suppress(sqlite3.Error):
                states = Counter(j["state"] for j in _manifest(out)[0].values())
                if states["done"] >= 4 and states["queued"] + states["submitting"] >= 2:
                    break
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic() - start
    at_kill, _ = _manifest(out)
    states_at_kill = Counter(j["state"] for j in at_kill.values())
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    total = time.monotonic() - start
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Resuming" in second.stderr and f"{JOBS} of {JOBS} jobs, 0 failed" in second.stderr
    jobs, bid = _manifest(out)
    assert all(j["state"] == "done" and os.path.isfile(j["outputs"][0]) for j in jobs.values())
    runs, per_server = Counter(), Counter()
    for server in (a, b):
        history = server.get_json("/history")
        for prompt_id, entry in history.items():
            extra = entry["prompt"][3] if len(entry.get("prompt") or []) > 3 else {}
            mark = (extra or {}).get("flux2kit_batch") or {}
            if mark.get("batch") == bid:
                assert entry["status"]["status_str"] == "success", entry["status"]
                runs[mark["job"]] += 1
                per_server[server.url] += 1
        queue = server.get_json("/queue")
        assert not queue["queue_running"] and not queue["queue_pending"]
    duplicates = sum(n - 1 for n in runs.values())
    print(f"\nreal ComfyUI x2: {JOBS} jobs; killed at {killed_at:.1f} s with {dict(states_at_kill)}; "
          f"done after {total:.1f} s; executions per server {dict(per_server)}; duplicates {duplicates}")
    assert sorted(runs) == list(range(1, JOBS + 1)) and duplicates == 0, runs
    assert set(per_server) == {a.url, b.url}
