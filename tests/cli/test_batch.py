"""``flux2kit batch`` against three local servers speaking ComfyUI's protocol (flux2kit.testing.fake_comfyui).

The servers run flux2kit's nodes on the tiny demo models, one torch thread each, and log every
prompt they queue, start and finish (fsynced), so the tests count executions per job from the
servers' side: an even spread, a bad row refused up front, the command SIGKILLed and run again, a
server SIGKILLed mid-run, a stop between recording a prompt id and sending it (both ways), a job
lost more often than --retries allows. Plus the in-process target with a UI-format workflow, and
the pieces (rows, keys, sweeps, names, the problem report, UI -> API conversion).
"""

import contextlib
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import PIL.Image
import pytest

from flux2kit.pipelines.errors import Flux2KitError

from flux2kit.testing.fake_comfyui import start_servers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API = os.path.join(REPO, "workflows", "api")
DEMO_NAMES = ["Flux2KitTransformerLoader.model_name=flux2_dev_tiny_fp8mixed.safetensors",
              "Flux2KitTextEncoderLoader.text_encoder_name=mistral_3_small_tiny/",
              "Flux2KitVAELoader.vae_name=flux2-vae-tiny.safetensors"]
FAST = ["size=64x64", "steps=1"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_servers")
    running = start_servers(3, root, root / "models")
    yield running
    for s in running:
        s.kill()


def settings(*extra):
    return [a for s in [*DEMO_NAMES, *FAST, *extra] for a in ("--set", s)]


def run_cli(*argv):
    from flux2kit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def manifest(out):
    db = sqlite3.connect(os.path.join(out, "batch.sqlite"))
    try:
        jobs = {r[0]: {"name": r[1], "state": r[2], "target": r[3], "outputs": json.loads(r[4] or "[]"),
                       "attempts": r[5]}
                for r in db.execute("SELECT job, name, state, target, outputs, attempts FROM jobs")}
        attempts = db.execute("SELECT job, prompt_id, target, state FROM attempts").fetchall()
        return jobs, attempts
    finally:
        db.close()


def executions(servers, batch_id, event="done"):
    """job number -> [server url, ...] for every ``event`` record of this batch on the servers."""
    found = {}
    for s in servers:
        for e in s.executions():
            if e["batch"] == batch_id and e["event"] == event:
                found.setdefault(e["job"], []).append(s.url)
    return found


def batch_id(out):
    db = sqlite3.connect(os.path.join(out, "batch.sqlite"))
    try:
        return json.loads(db.execute("SELECT value FROM meta WHERE key = 'batch_id'").fetchone()[0])
    finally:
        db.close()


def png(path, size=(32, 32), seed=0):
    rgb = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    PIL.Image.fromarray(rgb).save(path)
    return path


# -- the pieces --------------------------------------------------------------------------------------

def test_sweeps_keys_and_the_problem_report(tmp_path):
    from flux2kit.cli.batch.inputs import Problem, job_name as _job_name, targets_of as _targets, parse_sweep, \
        problem_report, read_rows
    from flux2kit.cli.workflow.files import load_workflow

    assert parse_sweep("seed=1..5") == ("seed", [1, 2, 3, 4, 5])
    assert parse_sweep("6.seed=0..20:10") == ("6.seed", [0, 10, 20])
    assert parse_sweep("prompt=a fox, a cat") == ("prompt", ["a fox", "a cat"])
    assert parse_sweep('prompt=["a, b", "c"]') == ("prompt", ["a, b", "c"])
    for bad in ("seed", "seed=5..1", "=1..3"):
        with pytest.raises(Flux2KitError, match="--sweep"):
            parse_sweep(bad)
    wf = load_workflow(os.path.join(API, "three_reference_edit.json"))
    assert _targets(wf, "seed") == [("9", "seed")]
    assert _targets(wf, "steps") == [("9", "num_inference_steps")]
    assert _targets(wf, "FLUX.2 Sampler (flux2kit).guidance") == [("9", "guidance")]  # a title with a dot
    assert _targets(wf, "image 2: the jacket.image") == [("6", "image")]
    assert _targets(wf, "size") == [("9", "width"), ("9", "height")]
    with pytest.raises(Flux2KitError, match="no node in the workflow has a 'colour' value"):
        _targets(wf, "colour")
    assert _job_name(7, None, {"seed": 3, "prompt": "A red fox, in snow!", "5.image": "/x/refs/cat photo.png"},
                     {}) == "00007-seed-3-a-red-fox-in-snow-cat-photo"
    assert _job_name(12, "Hero Shot #1", {"seed": 3}, {}) == "00012-hero-shot-1"
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"seed": 1}\n\n{"seed": 2,}\n[3]\n{"seed": null, "prompt": "x"}\n', encoding="utf-8")
    rows = read_rows(str(bad))
    assert rows[0] == (1, {"seed": 1}) and rows[3] == (4, {"prompt": "x"})  # blank lines skipped; null: keep
    assert rows[1][0] == 2 and rows[1][1].startswith("not valid JSON")
    assert rows[2] == (3, "a JSON list, not an object of key: value")
    report = problem_report([Problem(row, row, message) for row, message in
                             [(1, "a"), (2, "a"), (3, "a"), (5, "b"), (6, "b"), (8, "b"), (2, "c")]], total_rows=3)
    assert report.splitlines() == ["  every row: a", "  rows 5-6, 8: b", "  row 2: c"]
    # a row that makes no job still names its row; without an inputs file, the jobs are named
    assert problem_report([Problem(4, None, "not valid JSON"), Problem(4, 7, "x"), Problem(4, 8, "x")],
                          total_rows=4) == "  row 4: not valid JSON\n  row 4: x"
    assert problem_report([Problem(None, 2, "x"), Problem(None, 3, "x"), Problem(None, 5, "x"), Problem(None, 1, "y")],
                          total_rows=5) == "  jobs 2-3, 5: x\n  job 1: y"


def test_ui_workflows_convert_to_their_api_twins_with_the_servers_object_info(servers):
    from flux2kit.cli.batch import object_info_of
    from flux2kit.cli.workflow.files import read_workflow
    from flux2kit.cli.workflow.convert import ui_to_api

    info = object_info_of(servers[0].url)
    for name in ("text_to_image", "three_reference_edit", "generate_three_reference_edit"):
        ui, kind = read_workflow(os.path.join(REPO, "workflows", f"{name}.json"))
        api, _ = read_workflow(os.path.join(API, f"{name}.json"))
        assert kind == "ui"
        assert ui_to_api(ui, info) == api, name
    # a Reroute, a bypassed node on the way and a muted one: links pass through, the muted node is dropped
    ui, _ = read_workflow(os.path.join(REPO, "workflows", "text_to_image.json"))
    ui = json.loads(json.dumps(ui))
    ui["nodes"].append({"id": 20, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 6}],
                        "outputs": [{"name": "", "type": "IMAGE", "links": [30]}]})
    ui["nodes"].append({"id": 21, "type": "Flux2KitDecode", "mode": 2, "inputs": [], "widgets_values": []})
    save = next(n for n in ui["nodes"] if n["id"] == 7)
    save["inputs"][0]["link"] = 30
    ui["links"].append([30, 20, 0, 7, 0, "IMAGE"])
    api = ui_to_api(ui, info)
    assert api["7"]["inputs"]["images"] == ["6", 0] and "20" not in api and "21" not in api
    ui["nodes"].append({"id": 22, "type": "NotInstalled", "mode": 0, "inputs": [], "widgets_values": []})
    with pytest.raises(Flux2KitError, match=r"node #22 \(NotInstalled\): unknown node type"):
        ui_to_api(ui, info)


# -- against the servers -------------------------------------------------------------------------------

def test_a_bad_row_is_reported_up_front_and_nothing_runs(servers, tmp_path):
    rows = tmp_path / "rows.csv"
    with open(rows, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "seed", "FLUX.2 Sampler (flux2kit).num_inference_steps", "image 1: the person.image",
                    "Sampler.guidance"])
        w.writerow(["fine", "1", "1", "", ""])
        w.writerow(["bad seed", "many", "1", "", ""])
        w.writerow(["too many steps", "3", "80", "", ""])
        w.writerow(["missing file", "4", "1", "nowhere.png", ""])
        w.writerow(["unknown node", "5", "1", "", "2.0"])
        w.writerow(["fine again", "6", "1", "", ""])
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("batch", os.path.join(API, "three_reference_edit.json"), rows, "--out", out,
                                   "--server", servers[0].url, "--server", servers[1].url, *settings(), "--json")
    assert code == 2, stderr
    assert "Nothing was run: 7 problem(s) in the inputs" in stderr
    assert "row 2: seed: Expected a whole number, got 'many'." in stderr
    assert "row 3: node #9 (Flux2KitSampler): input 'num_inference_steps' is 80, above the maximum 50" in stderr
    assert "row 4: node #5 (LoadImage): image 'nowhere.png' is not a file" in stderr
    assert "row 5: Sampler.guidance: No node 'Sampler' in the workflow" in stderr
    # the workflow's own LoadImage files are not on the server either: one line for every row, not six
    assert "every row: node #6 (LoadImage): image 'flux2kit_jacket.png' is not a file" in stderr
    assert "rows 1-3, 5-6: node #5 (LoadImage): image 'flux2kit_person.png' is not a file" in stderr
    assert json.loads(stdout.splitlines()[-1])["event"] == "invalid"
    assert not out.exists() or not os.listdir(out)  # no manifest, no images
    for s in servers:
        assert not [e for e in s.executions() if e["event"] == "queued"], "a job was submitted"


def test_rows_and_a_sweep_spread_evenly_over_three_servers(servers, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, name in enumerate(["person_a.png", "person_b.png", "jacket.png", "street.png"]):
        png(refs / name, (64, 80) if i % 2 else (80, 64), seed=i)
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "the person from image 1 in a jacket", "image 1: the person.image": "refs/person_a.png"},
        {"prompt": "the other person", "image 1: the person.image": "refs/person_b.png", "_client": "acme"},
        {"prompt": "the person from image 1 in a jacket", "image 1: the person.image": "refs/person_a.png",
         "_name": "hero"},
    ])
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        "batch", os.path.join(API, "three_reference_edit.json"), rows, "--out", out, "--sweep", "seed=1..3",
        *[a for u in servers for a in ("--server", u.url)], "--per-server", 2,
        *settings(f"image 2: the jacket.image={refs / 'jacket.png'}",
                  f"image 3: the street.image={refs / 'street.png'}"),
        "--json")
    assert code == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["done"] == 9 and summary["failed"] == 0
    assert any(e["event"] == "progress" for e in events)
    jobs, attempts = manifest(out)
    assert sorted(j["state"] for j in jobs.values()) == ["done"] * 9
    # even spread: 2 slots per server fill 6 jobs two by two, the other 3 go where a slot frees up
    per_server = Counter(j["target"] for j in jobs.values())
    assert set(per_server) == {s.url for s in servers} and min(per_server.values()) >= 2, per_server
    done = executions(servers, batch_id(out))
    assert sorted(done) == list(range(1, 10)) and all(len(v) == 1 for v in done.values())  # each ran once
    for s in servers:  # never more than --per-server of ours queued on one server
        depths = [e["depth"] for e in s.executions() if e["event"] == "queued" and e["batch"] == batch_id(out)]
        assert depths and max(depths) <= 2, depths
        uploaded = sorted(os.listdir(s.root / "input" / "flux2kit_batch"))
        assert all(name.split("_", 1)[1] in {"person_a.png", "person_b.png", "jacket.png", "street.png"}
                   for name in uploaded)
    # names from the row and the sweep, stable and unique; a sidecar with the inputs next to each image
    names = [jobs[i]["name"] for i in range(1, 10)]
    assert names[0] == "00001-the-person-from-image-1-person-a-seed-1"
    assert names[3] == "00004-the-other-person-person-b-seed-1" and names[8] == "00009-hero"
    for job in jobs.values():
        (image,) = job["outputs"]
        assert os.path.basename(image) == job["name"] + ".png"
        with PIL.Image.open(image) as im:
            assert im.size == (64, 64)
        with open(os.path.join(out, job["name"] + ".json"), encoding="utf-8") as f:
            sidecar = json.load(f)
        assert sidecar["image"] == job["name"] + ".png" and sidecar["target"] == job["target"]
    with open(os.path.join(out, "00005-the-other-person-person-b-seed-2.json"), encoding="utf-8") as f:
        sidecar = json.load(f)
    assert sidecar["row"] == 2 and sidecar["values"]["seed"] == 2 and sidecar["_client"] == "acme"
    assert sidecar["set"]["9.seed"] == 2 and sidecar["set"]["5.image"] == str(refs / "person_b.png")
    # the same seed and references make the same image on any server; another seed another image
    a = np.asarray(PIL.Image.open(jobs[1]["outputs"][0]))
    assert np.array_equal(a, np.asarray(PIL.Image.open(jobs[7]["outputs"][0])))
    assert not np.array_equal(a, np.asarray(PIL.Image.open(jobs[2]["outputs"][0])))
    # run again: everything is done, nothing is submitted
    queued_before = sum(len(s.executions()) for s in servers)
    code, _, stderr = run_cli("batch", os.path.join(API, "three_reference_edit.json"), rows, "--out", out,
                              "--sweep", "seed=1..3", *[a for u in servers for a in ("--server", u.url)],
                              *settings(f"image 2: the jacket.image={refs / 'jacket.png'}",
                                        f"image 3: the street.image={refs / 'street.png'}"))
    assert code == 0 and "9 of 9 jobs" in stderr
    assert sum(len(s.executions()) for s in servers) == queued_before
    # another sweep into the same folder is refused, not mixed in
    code, _, stderr = run_cli("batch", os.path.join(API, "three_reference_edit.json"), rows, "--out", out,
                              "--sweep", "seed=4..6", "--server", servers[0].url,
                              *settings(f"image 2: the jacket.image={refs / 'jacket.png'}",
                                        f"image 3: the street.image={refs / 'street.png'}"))
    assert code == 2 and "holds a batch whose job 1" in stderr


def test_the_command_killed_and_run_again_resumes_without_repeating(servers, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"lighthouse number {i}", "seed": i} for i in range(14)])
    out = tmp_path / "out"
    two = servers[:2]
    cmd = [sys.executable, "-m", "flux2kit.cli", "batch", os.path.join(API, "text_to_image.json"), str(rows),
           "--out", str(out), *[a for u in two for a in ("--server", u.url)], "--per-server", "2", *settings()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 120
    while True:  # kill it while jobs are queued on the servers and some are done
        time.sleep(0.1)
        if os.path.exists(out / "batch.sqlite"):
            with contextlib.suppress(sqlite3.Error):
                states = Counter(j["state"] for j in manifest(out)[0].values())
                if states["done"] >= 3 and states["queued"] + states["submitting"] >= 2:
                    break
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    jobs_at_kill, _ = manifest(out)
    in_flight = {i for i, j in jobs_at_kill.items() if j["state"] in ("queued", "submitting")}
    assert in_flight
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming" in second.stderr and "14 of 14 jobs, 0 failed" in second.stderr
    jobs, attempts = manifest(out)
    assert all(j["state"] == "done" and os.path.isfile(j["outputs"][0]) for j in jobs.values())
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 14
    done = executions(two, batch_id(out))
    assert sorted(done) == list(range(1, 15)) and all(len(v) == 1 for v in done.values()), done  # nothing repeated
    queued = executions(two, batch_id(out), "queued")
    assert all(len(v) == 1 for v in queued.values()), queued  # not even submitted twice
    assert all(jobs[i]["attempts"] == 1 for i in in_flight)  # re-attached, not retried


def test_a_server_killed_mid_run_its_jobs_finish_elsewhere(servers, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"a small boat {i}", "seed": i} for i in range(12)])
    out = tmp_path / "out"
    result = {}

    def run():
        result["run"] = run_cli("batch", os.path.join(API, "text_to_image.json"), rows, "--out", out,
                                *[a for u in servers for a in ("--server", u.url)], "--per-server", 2, "--retries", 1,
                                *settings())

    thread = threading.Thread(target=run)
    thread.start()
    victim = servers[2]
    deadline = time.monotonic() + 120
    while True:  # kill it once it has finished a job of this batch and is running another
        ours = [e for e in victim.executions() if "small-boat" in (e.get("name") or "")]
        if ours and ours[-1]["event"] == "start" and any(e["event"] == "done" for e in ours):
            break
        assert time.monotonic() < deadline and thread.is_alive(), result
        time.sleep(0.05)
    victim.kill()  # SIGKILL: its running and queued prompts are gone with it
    thread.join(timeout=240)
    assert not thread.is_alive()
    code, stdout, stderr = result["run"]
    assert code == 0, stderr
    assert "stopped answering" in stderr and "12 of 12 jobs, 0 failed" in stderr
    jobs, attempts = manifest(out)
    bid = batch_id(out)
    lost = {job for job, _, target, state in attempts if state == "lost"}
    assert lost and all(t == victim.url for job, _, t, s in attempts if s == "lost")
    assert all(j["state"] == "done" and j["target"] != victim.url for i, j in jobs.items() if i in lost)
    assert all(j["attempts"] == 2 for i, j in jobs.items() if i in lost)
    # every job's image was made exactly once by the servers it was collected from; the victim's
    # unfinished work is the only other execution
    live = executions(servers[:2], bid)
    victim_done = executions([victim], bid)
    collected = Counter(job for job, _, _, state in attempts if state == "done")
    assert sorted(collected) == list(range(1, 13)) and set(collected.values()) == {1}
    for job in range(1, 13):
        runs = live.get(job, []) + victim_done.get(job, [])
        assert len(runs) == 1 or (job in lost and len(live.get(job, [])) == 1), (job, runs)
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 12


# -- in-process --------------------------------------------------------------------------------------

def test_local_target_runs_a_ui_workflow_in_process(comfy, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("batch", os.path.join(REPO, "workflows", "text_to_image.json"), "--out", out,
                                   "--target", "local", "--models", comfy / "models", "--sweep", "seed=1..2",
                                   "--set", "prompt=a tiny lighthouse", *[a for s in FAST for a in ("--set", s)],
                                   "--json")
    assert code == 0, stderr
    assert "Converted the UI workflow" in stderr
    jobs, _ = manifest(out)
    assert [jobs[i]["name"] for i in (1, 2)] == ["00001-seed-1", "00002-seed-2"]
    assert all(j["state"] == "done" and j["target"] == "local" for j in jobs.values())
    images = [np.asarray(PIL.Image.open(jobs[i]["outputs"][0])) for i in (1, 2)]
    assert images[0].shape == (64, 64, 3) and not np.array_equal(*images)
    assert not os.listdir(out / ".staging" / "flux2kit")  # moved to their names, not copied
    with open(out / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["per_target"] == {"local": 2}


def test_a_stop_between_the_record_and_the_post_never_duplicates(servers, tmp_path):
    """Jobs left "submitting": one whose POST reached the server (same prompt id) and one whose never did."""
    import uuid

    from flux2kit.cli.batch.dispatch import Batch

    from flux2kit.cli.batch.inputs import Plan

    from flux2kit.cli.batch import object_info_of
    from flux2kit.cli.workflow.files import load_workflow

    server = servers[0]
    plan = Plan(load_workflow(os.path.join(API, "text_to_image.json")), None, [("seed", [71, 72, 73])],
                [*DEMO_NAMES, *FAST], str(tmp_path))
    jobs, problems = plan.jobs(object_info_of(server.url))
    assert not problems
    out = tmp_path / "out"
    first = Batch(jobs, out, [server.url], log=lambda m: None)  # the manifest, as a killed run left it:
    first.manifest.close()
    reached, lost = str(uuid.uuid4()), str(uuid.uuid4())
    db = sqlite3.connect(out / "batch.sqlite")
    with db:
        for job, prompt_id in ((1, reached), (2, lost)):
            db.execute("UPDATE jobs SET state = 'submitting', target = ?, prompt_id = ? WHERE job = ?",
                       (server.url, prompt_id, job))
            db.execute("INSERT INTO attempts (prompt_id, job, target, state, time) VALUES (?, ?, ?, 'submitting', 0)",
                       (prompt_id, job, server.url))
        bid = json.loads(db.execute("SELECT value FROM meta WHERE key = 'batch_id'").fetchone()[0])
    db.close()
    # ... and the POST of job 1 got there just before the kill
    from flux2kit.cli.comfy_client import ComfyClient

    ComfyClient(server.url).queue_prompt(jobs[0].workflow, prompt_id=reached, extra_data={
        "flux2kit_batch": {"batch": bid, "job": 1, "name": jobs[0].name}})
    messages = []
    summary = Batch(jobs, out, [server.url], log=messages.append).run()
    assert summary["done"] == 3 and summary["failed"] == 0
    assert any("Resuming" in m and "2 to look up" in m for m in messages)
    queued = [e for e in server.executions() if e["batch"] == bid and e["event"] == "queued"]
    assert Counter(e["job"] for e in queued) == {1: 1, 2: 1, 3: 1}  # each sent once
    assert next(e["prompt_id"] for e in queued if e["job"] == 1) == reached  # re-attached by its id
    assert next(e["prompt_id"] for e in queued if e["job"] == 2) != lost
    jobs_after, attempts = manifest(out)
    assert {p: s for _, p, _, s in attempts if p in (reached, lost)} == {reached: "done", lost: "never arrived"}
    assert [jobs_after[i]["attempts"] for i in (1, 2, 3)] == [1, 1, 1]


def test_a_job_lost_more_often_than_retries_allow_fails_with_the_reason(servers, tmp_path):
    """A job the server accepted and then no longer knows (a restart) counts as lost; --retries 0: failed."""
    import uuid

    from flux2kit.cli.batch.dispatch import Batch

    from flux2kit.cli.batch.inputs import Plan

    from flux2kit.cli.batch import object_info_of
    from flux2kit.cli.workflow.files import load_workflow

    server = servers[0]
    plan = Plan(load_workflow(os.path.join(API, "text_to_image.json")), None, [("seed", [81, 82])],
                [*DEMO_NAMES, *FAST], str(tmp_path))
    jobs, _ = plan.jobs(object_info_of(server.url))
    out = tmp_path / "out"
    Batch(jobs, out, [server.url], log=lambda m: None).manifest.close()
    forgotten = str(uuid.uuid4())
    db = sqlite3.connect(out / "batch.sqlite")
    with db:
        db.execute("UPDATE jobs SET state = 'queued', target = ?, prompt_id = ?, attempts = 1 WHERE job = 1",
                   (server.url, forgotten))
        db.execute("INSERT INTO attempts (prompt_id, job, target, state, time) VALUES (?, 1, ?, 'queued', 0)",
                   (forgotten, server.url))
    db.close()
    summary = Batch(jobs, out, [server.url], retries=0, log=lambda m: None).run()
    assert summary["done"] == 1 and summary["failed"] == 1
    (reason,) = summary["failures"].values()
    assert f"{server.url} no longer knows prompt {forgotten} (restarted?); given up after 1 attempts (--retries 0)" \
        == reason
    jobs_after, attempts = manifest(out)
    assert jobs_after[1]["state"] == "failed" and jobs_after[2]["state"] == "done"
    assert ("lost" in {s for _, p, _, s in attempts if p == forgotten})
    # resumed with --retry-failed: the failed job runs again, the done one is left alone
    summary = Batch(jobs, out, [server.url], retry_failed=True, log=lambda m: None).run()
    assert summary["done"] == 2 and summary["failed"] == 0 and summary["done_this_run"] == 1
    assert [e["job"] for e in server.executions() if e["event"] == "done" and e["name"] in
            {j.name for j in jobs}] == [2, 1]


def test_a_prompt_a_slow_server_queues_late_is_re_attached_not_sent_again(servers, tmp_path):
    """A POST that timed out here (the server slow) may still be queued there: the id is looked for a while."""
    import uuid

    from flux2kit.cli.batch.dispatch import Batch

    from flux2kit.cli.batch.inputs import Plan


    from flux2kit.cli.batch import object_info_of
    from flux2kit.cli.comfy_client import ComfyClient
    from flux2kit.cli.workflow.files import load_workflow

    server = servers[1]
    plan = Plan(load_workflow(os.path.join(API, "text_to_image.json")), None, [("seed", [91])],
                [*DEMO_NAMES, *FAST], str(tmp_path))
    jobs, _ = plan.jobs(object_info_of(server.url))
    out = tmp_path / "out"
    Batch(jobs, out, [server.url], log=lambda m: None).manifest.close()
    late = str(uuid.uuid4())
    db = sqlite3.connect(out / "batch.sqlite")
    with db:  # recorded and POSTed just now; the server has not queued it yet
        db.execute("UPDATE jobs SET state = 'submitting', target = ?, prompt_id = ?, submitted = ? WHERE job = 1",
                   (server.url, late, time.time()))
        db.execute("INSERT INTO attempts (prompt_id, job, target, state, time) VALUES (?, 1, ?, 'submitting', 0)",
                   (late, server.url))
        bid = json.loads(db.execute("SELECT value FROM meta WHERE key = 'batch_id'").fetchone()[0])
    db.close()

    def arrive():
        time.sleep(1.5)
        ComfyClient(server.url).queue_prompt(jobs[0].workflow, prompt_id=late, extra_data={
            "flux2kit_batch": {"batch": bid, "job": 1, "name": jobs[0].name}})

    thread = threading.Thread(target=arrive)
    thread.start()
    summary = Batch(jobs, out, [server.url], log=lambda m: None).run()
    thread.join()
    assert summary["done"] == 1 and summary["failed"] == 0
    queued = [e for e in server.executions() if e["batch"] == bid and e["event"] == "queued"]
    assert [e["prompt_id"] for e in queued] == [late]  # collected from the late prompt, not submitted again


def test_an_image_the_server_cannot_give_is_retried_then_failed_not_asked_for_forever(servers, tmp_path,
                                                                                       monkeypatch):
    from flux2kit.cli.batch.dispatch import Batch
    from flux2kit.cli.batch.inputs import Plan
    from flux2kit.cli.batch import object_info_of
    from flux2kit.cli import comfy_client
    from flux2kit.cli.workflow.files import load_workflow

    server = servers[0]
    plan = Plan(load_workflow(os.path.join(API, "text_to_image.json")), None, [("seed", [95])],
                [*DEMO_NAMES, *FAST], str(tmp_path))
    jobs, _ = plan.jobs(object_info_of(server.url))

    def view(self, item):
        raise comfy_client.Refused(404, b'{"error": "not found"}')

    monkeypatch.setattr(comfy_client.ComfyClient, "view", view)
    result = {}
    thread = threading.Thread(target=lambda: result.update(summary=Batch(
        jobs, tmp_path / "out", [server.url], retries=1, log=lambda m: None).run()), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the batch kept asking for an image the server does not have"
    summary = result["summary"]
    assert summary["failed"] == 1
    (reason,) = summary["failures"].values()
    assert "cannot give image" in reason and "HTTP 404" in reason and "given up after 2 attempts" in reason


def test_two_commands_on_one_folder_and_bad_options_are_refused(tmp_path):
    from flux2kit.cli.batch.manifest import Manifest
    from flux2kit.cli.batch.inputs import read_rows
    from flux2kit.cli.workflow.schema import check_value

    first = Manifest(str(tmp_path / "out"))
    with pytest.raises(Flux2KitError, match="Another flux2kit batch command is using"):
        Manifest(str(tmp_path / "out"))
    first.close()
    Manifest(str(tmp_path / "out")).close()  # free again once the first is done
    latin = tmp_path / "rows.csv"
    latin.write_bytes("prompt\ncaf\xe9 au lait\n".encode("latin-1"))  # Excel's "CSV" on Windows
    with pytest.raises(Flux2KitError, match="is not UTF-8 text"):
        read_rows(str(latin))
    code, _, stderr = run_cli("batch", os.path.join(API, "text_to_image.json"), "--out", tmp_path / "o",
                              "--server", "http://127.0.0.1:9", "--per-server", 0, "--sweep", "seed=1..2")
    assert code == 2 and "--per-server must be 1 or more" in stderr
    assert check_value(["FLOAT", {"min": 0.0, "max": 10.0}], float("nan")) == "must be a number, got nan"


def test_the_folder_lock_is_freed_on_close_and_when_the_manifest_cannot_open(tmp_path):
    from flux2kit.cli.batch.manifest import Manifest

    out = tmp_path / "out"
    holder = "from flux2kit.cli.batch.manifest import Manifest; import sys; Manifest(sys.argv[1]).close()"
    with Manifest(str(out)):
        other = subprocess.run([sys.executable, "-c", holder, str(out)], capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "Another flux2kit batch command is using" in other.stderr  # another command
    other = subprocess.run([sys.executable, "-c", holder, str(out)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr  # free once the first is closed
    first = Manifest(str(out))
    first.close()
    first.close()  # closing again does nothing
    os.remove(out / "batch.sqlite")
    os.mkdir(out / "batch.sqlite")  # the database cannot be opened...
    with pytest.raises(sqlite3.Error):
        Manifest(str(out))
    os.rmdir(out / "batch.sqlite")
    Manifest(str(out)).close()  # ... and the failed open did not keep the folder locked


def test_the_stored_state_strings_never_change():
    from flux2kit.cli.batch.records import AttemptState, JobState

    assert [s.value for s in JobState] == ["pending", "submitting", "queued", "running", "done", "failed"]
    assert [s.value for s in AttemptState] == ["submitting", "queued", "never arrived", "abandoned", "lost", "failed",
                                               "done"]


# The manifest's schema as the first versions wrote it, kept verbatim: folders they left behind must resume.
EARLIER_SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE IF NOT EXISTS jobs (
        job INTEGER PRIMARY KEY, name TEXT NOT NULL, row INTEGER, fingerprint TEXT NOT NULL, inputs TEXT NOT NULL,
        state TEXT NOT NULL, target TEXT, prompt_id TEXT, attempts INTEGER NOT NULL DEFAULT 0,
        outputs TEXT, error TEXT, submitted REAL, finished REAL);
    CREATE TABLE IF NOT EXISTS attempts (
        prompt_id TEXT PRIMARY KEY, job INTEGER NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL,
        reason TEXT, time REAL NOT NULL);
    """


def test_a_manifest_an_earlier_version_wrote_resumes(tmp_path):
    import hashlib

    from flux2kit.cli.batch.dispatch import Batch
    from flux2kit.cli.batch.manifest import Manifest
    from flux2kit.cli.batch.records import Job, JobState

    workflow = load_api("text_to_image")
    jobs = [Job(index=i, row=None, values={"seed": i}, meta={}, name=f"0000{i}-seed-{i}", workflow=workflow,
                images={}, assigned={"5.seed": i}) for i in (1, 2)]
    out = tmp_path / "out"
    out.mkdir()
    url, other = "http://127.0.0.1:8188", "http://127.0.0.1:8189"
    db = sqlite3.connect(out / "batch.sqlite")
    with db:  # as an earlier version left it: its fingerprint, its JSON, its state strings
        db.executescript(EARLIER_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('batch_id', ?), ('workflow', ?)", (json.dumps("b" * 32), '"t.json"'))
        for number, state in enumerate(["done", "failed", "pending", "submitting", "queued", "running"], start=1):
            name = f"0000{number}-seed-{number}"
            fingerprint = hashlib.sha256(json.dumps({"workflow": workflow, "name": name}, sort_keys=True,
                                                    default=str).encode()).hexdigest()
            db.execute("INSERT INTO jobs (job, name, fingerprint, inputs, state, target, attempts, outputs, error) "
                       "VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
                       (number, name, fingerprint, json.dumps({"values": {"seed": number}}), state, url,
                        json.dumps([str(out / f"{name}.png")]) if state == "done" else None,
                        "boom" if state == "failed" else None))
        db.executemany("INSERT INTO attempts (prompt_id, job, target, state, reason, time) VALUES (?, ?, ?, ?, ?, 0)",
                       [("p1", 1, url, "done", None), ("p0", 1, url, "lost", "gone"), ("p2", 2, url, "failed", "boom"),
                        ("p3", 2, other, "abandoned", "down"), ("p4", 1, url, "never arrived", None)])
    db.close()
    with Manifest(str(out)) as manifest:
        records = manifest.records()
        assert [records[i].state for i in range(1, 7)] == [JobState.DONE, JobState.FAILED, JobState.PENDING,
                                                           JobState.SUBMITTING, JobState.QUEUED, JobState.RUNNING]
        assert records[1].outputs == [str(out / "00001-seed-1.png")] and records[2].error == "boom"
        assert records[1].inputs == {"values": {"seed": 1}} and records[2].outputs is None
        assert manifest.stale_prompts(url) == ["p0"] and manifest.stale_prompts(other) == ["p3"]
        assert manifest.done_per_target() == {url: 1}
        assert manifest.batch_id("another.json") == "b" * 32  # kept, not made again
    # resumed with two of its jobs (done and failed): nothing to run, the summary as recorded
    messages = []
    summary = Batch(jobs, out, [], log=messages.append).run()
    assert (summary["done"], summary["failed"], summary["jobs"], summary["done_this_run"]) == (1, 1, 2, 0)
    assert summary["per_target"] == {url: 1} and summary["failures"] == {"00002-seed-2": "boom"}
    assert any(m.startswith("Resuming") and "1 done, 0 to look up" in m for m in messages)
    # other inputs are refused, and the refusal leaves the folder free
    changed = Job(**{**vars(jobs[0]), "workflow": {**workflow, "9": {"class_type": "X", "inputs": {}}}})
    with pytest.raises(Flux2KitError, match="holds a batch whose job 1"):
        Batch([changed], out, [], log=messages.append)
    Manifest(str(out)).close()


def test_a_reference_image_gone_before_its_upload_fails_the_job_not_the_server(servers, tmp_path):
    from flux2kit.cli.batch.dispatch import Batch
    from flux2kit.cli.batch.inputs import Plan
    from flux2kit.cli.batch import object_info_of

    server = servers[0]
    refs = [png(tmp_path / f"ref{i}.png", seed=i) for i in range(3)]
    plan = Plan(load_api("three_reference_edit"), None, [("seed", [97])],
                [*DEMO_NAMES, *FAST, *[f"image {i + 1}: the {w}.image={r}" for i, (w, r) in
                                       enumerate(zip(("person", "jacket", "street"), refs))]], str(tmp_path))
    jobs, problems = plan.jobs(object_info_of(server.url))
    assert not problems, problems
    os.remove(refs[1])  # after the check, before the upload
    result = {}
    thread = threading.Thread(target=lambda: result.update(summary=Batch(
        jobs, tmp_path / "out", [server.url], log=lambda m: None).run()), daemon=True)
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive(), "the batch kept submitting a job whose image is gone"
    (reason,) = result["summary"]["failures"].values()
    assert reason == f"cannot read {refs[1]}: No such file or directory"


def load_api(name):
    from flux2kit.cli.workflow.files import load_workflow

    return load_workflow(os.path.join(API, f"{name}.json"))
