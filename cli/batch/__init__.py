"""``flux2kit batch``: one workflow over a list of inputs, on ComfyUI servers or in-process, resumable.

Rows (JSONL or CSV) and sweeps set values in the workflow; every resulting job is validated before
anything runs, recorded in a SQLite manifest in the output folder, spread over the targets by their
free capacity (``/queue``), and its images fetched under names derived from the row, each with a
JSON sidecar of the inputs.

Nothing is lost or done twice when the command is killed: a job is written as "submitting" with a
prompt id made here *before* ``POST /prompt`` sends that id, so after a restart every job that may
have reached a server is looked up there by its id (``/queue``, ``/history``): still queued or
running, it is watched; finished, it is collected; unknown, it is submitted again. A server that
stops answering has its jobs retried elsewhere, at most ``--retries`` times.

Keys (column names, ``--sweep`` and ``--set`` names):

- ``NODE.INPUT``: one input of one node; NODE is a node id, a title or a class type (``6.seed``,
  ``Prompt.prompt``, ``Flux2KitSampler.guidance``);
- ``INPUT`` (no dot): that input of every node that has it as a value (``prompt``, ``seed``);
  ``steps`` means ``num_inference_steps``; ``size`` (``WxH``) sets width and height;
- ``_name``: the job's name instead of one made from its values; other columns starting with ``_``
  are carried into the sidecars untouched.

Values take the type of the input they set (CSV text is parsed); an empty cell or a JSON null keeps
the workflow's value. An image input (LoadImage's ``image``) takes a path, relative to the inputs
file's folder, uploaded to each server that runs a job needing it.

Modules: ``inputs`` (rows, sweeps, keys -> jobs, checked), ``records`` (the job, its states, its manifest
row), ``manifest`` (SQLite: all of the batch's SQL), ``targets`` (the targets: a ComfyUI server through the
client, or in-process), ``dispatch`` (the loop); this file is the command.
"""


from __future__ import annotations

import json
import os
from dataclasses import replace

from ...pipelines.errors import Flux2KitError
from ..comfy_client import ComfyClient, Refused, Unreachable
from ..local_runner import LOADERS, LocalRunner, local_object_info
from ..terminal import say
from ..workflow.convert import ui_to_api
from ..workflow.files import read_workflow
from ..workflow.schema import spec_of
from .dispatch import Batch
from .inputs import Plan, parse_sweep, problem_report, read_rows
from .manifest import MANIFEST
from .targets import LOCAL


def object_info_of(url: str) -> dict:
    server = ComfyClient(url)
    try:
        return server.object_info()
    except Unreachable as e:
        raise Flux2KitError(f"Cannot reach the ComfyUI server at {server.url} ({e}). Is it running "
                            f"(python main.py --listen)? Drop it from the command to run on the others.") from None
    except Refused as e:
        if e.code == 200:
            raise Flux2KitError(f"{server.url}/object_info did not answer JSON; is it a ComfyUI server?") from None
        raise Flux2KitError(f"{server.url}/object_info answered {e}; is it a ComfyUI server?") from None


def batch_command(args) -> dict:
    """``flux2kit batch``: validate every job, then run them (or resume); returns the summary."""
    servers = [t for t in (args.targets or []) if t != LOCAL]
    use_local = LOCAL in (args.targets or [])
    if not servers and not use_local:
        raise Flux2KitError("Where should the jobs run? Give --server URL (repeatable) for ComfyUI servers, "
                            "or --target local to run in this process.")
    if args.per_server < 1 or args.retries < 0:  # --per-server 0 would wait for a free slot forever
        raise Flux2KitError(f"--per-server must be 1 or more and --retries 0 or more (got {args.per_server} and "
                            f"{args.retries}).")
    data, kind = read_workflow(args.workflow)
    infos, runner = {}, None
    for url in servers:
        infos[url] = object_info_of(url)
    if use_local:
        runner = _local_runner(args)
        infos[LOCAL] = local_object_info(runner)
    first = infos[servers[0]] if servers else infos[LOCAL]
    workflow = ui_to_api(data, first) if kind == "ui" else data
    if kind == "ui":
        say(f"Converted the UI workflow {args.workflow} to the API format with "
             f"{'the node schemas of ' + (servers[0] if servers else 'this process')}.")
    rows = read_rows(args.inputs) if args.inputs else None
    base_dir = os.path.dirname(os.path.abspath(args.inputs)) if args.inputs else os.getcwd()
    plan = Plan(workflow, rows, [parse_sweep(s) for s in args.sweeps or []], args.settings or [], base_dir)
    jobs, found = None, {}
    for where, info in infos.items():
        these, issues = plan.jobs(info if where != LOCAL or not getattr(runner, "demo", False) else _demo_info(info))
        jobs = jobs or these
        found[where] = issues
    # A problem every target has is reported once; one only some targets have names them.
    common = set.intersection(*(set(issues) for issues in found.values()))
    problems = [p for p in next(iter(found.values())) if p in common]
    for where, issues in found.items():
        problems += [replace(p, message=f"on {where}: {p.message}") for p in issues if p not in common]
    if not jobs and not problems:
        raise Flux2KitError("No jobs: the inputs file has no rows.")
    if problems:
        total_rows = len(plan.rows) if rows is not None else len(jobs or [])
        report = problem_report(problems, total_rows)
        if args.json:
            print(json.dumps({"event": "invalid", "problems": report.splitlines()}), flush=True)
        counting = "rows count from 1, the CSV header not counted" if rows is not None else "jobs count from 1"
        raise Flux2KitError(f"Nothing was run: {len(report.splitlines())} problem(s) in the inputs ({counting}):"
                            f"\n{report}")
    say(f"{len(jobs)} job(s) on {', '.join(servers + ([LOCAL] if use_local else []))}; manifest "
         f"{os.path.join(os.path.abspath(args.out), MANIFEST)}.")
    batch = Batch(jobs, args.out, servers, runner, per_server=args.per_server, retries=args.retries,
                  json_events=args.json, retry_failed=args.retry_failed, workflow_name=os.path.basename(args.workflow))
    try:
        summary = batch.run()
    except KeyboardInterrupt:
        running = batch.counts()["running"]
        say(f"\nflux2kit: batch stopped. {running} job(s) stay queued on their servers; run the same command again "
             f"to collect them and run the rest.")
        raise SystemExit(130) from None
    if summary["failed"]:
        raise Flux2KitError(f"{summary['failed']} of {summary['jobs']} jobs failed (reasons in "
                            f"{os.path.join(batch.out_dir, 'summary.json')}); the others are done. "
                            "--retry-failed runs the failed ones again.")
    return summary


def _demo_info(info: dict) -> dict:
    """On the demo models the loaders' names map to the tiny files: do not check them against the folder."""
    info = json.loads(json.dumps(info))
    for node, (name, _, _) in LOADERS.items():
        spec = spec_of(info.get(node) or {}, name)
        if spec is not None and len(spec) > 1 and isinstance(spec[1], dict):
            spec[1]["options"] = []
            if isinstance(spec[0], list):
                spec[0] = "COMBO"
    return info


def _local_runner(args):
    from ...pipelines.demo_models import build_demo_models, demo_models_ready

    models = os.path.abspath(args.models or "./demo-models")
    build_demo = args.demo or args.models is None
    if build_demo:
        say(f"Using the tiny demo models in {models}." if demo_models_ready(models) else
             f"Building tiny demo models in {models} (once; about 25 MB, a few seconds)...")
        build_demo_models(models)
    demo = build_demo or demo_models_ready(models)
    staging = os.path.join(os.path.abspath(args.out), ".staging")
    return LocalRunner(models, staging, input_dir=args.input, demo=demo, log=lambda m: None)


def add_batch_arguments(parser) -> None:
    """The ``flux2kit batch`` options (cli.py builds the sub-command)."""
    add = parser.add_argument
    add("workflow", metavar="WORKFLOW.json", help="a workflow in API or UI format")
    add("inputs", nargs="?", metavar="INPUTS.jsonl|csv",
        help="one job per row: keys NODE.INPUT (NODE an id, title or class type) or INPUT (every node with it), "
             "size=WxH, _name; optional with --sweep")
    add("--out", required=True, metavar="DIR", help="folder for the images, their JSON sidecars and the manifest "
                                                    "(batch.sqlite); run again with the same DIR to resume")
    add("--server", dest="targets", action="append", metavar="URL", help="a ComfyUI server (repeatable)")
    add("--target", dest="targets", action="append", metavar="local|URL",
        help="'local' runs jobs in this process (flux2kit's nodes and LoadImage); a URL is the same as --server")
    add("--per-server", type=int, default=2, metavar="N",
        help="at most N prompts queued on a server at once, counting other users' (default: 2)")
    add("--retries", type=int, default=2, metavar="N",
        help="a job lost with its server is retried elsewhere up to N times, then marked failed (default: 2)")
    add("--sweep", dest="sweeps", action="append", metavar="KEY=VALUES",
        help="seed=1..100, steps=4..28:8, prompt=a,b,c or a JSON list; several sweeps and the rows combine as a "
             "product (repeatable)")
    add("--set", dest="settings", action="append", metavar="KEY=VALUE", help="set a value for every job (repeatable)")
    add("--retry-failed", action="store_true", help="when resuming, run the jobs that failed before again")
    add("--json", action="store_true", help="machine-readable events on stdout, one JSON object per line")
    add("--models", metavar="DIR", help="models folder for --target local (default: the tiny demo models in "
                                        "./demo-models)")
    add("--demo", action="store_true", help="--target local on the tiny random demo models")
    add("--input", metavar="DIR", help="ComfyUI's input folder for --target local (default: ./input)")
