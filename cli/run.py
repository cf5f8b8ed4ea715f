"""``flux2kit run``: one workflow, in this process (flux2kit's nodes on the tiny demo models or real files) or on
a ComfyUI server, with the command line's changes; prints the saved images' paths."""

from __future__ import annotations

import os

from ..pipelines.errors import Flux2KitError
from .arguments import parse_size
from .local_runner import LOADERS, LocalRunner
from .server_runner import ServerRunner
from .terminal import say
from .workflow.files import load_workflow
from .workflow.graph import constant_inputs
from .workflow.overrides import apply_overrides


def run_workflow(args) -> None:
    for path in run_command(args):
        print(path)


def run_command(args) -> list[str]:
    """``flux2kit run``: apply the overrides, run in-process or on the server, return the image paths."""
    from ..pipelines.demo_models import build_demo_models, demo_models_ready

    workflow = load_workflow(args.workflow)
    models = os.path.abspath(args.models or "./demo-models")
    # A workflow without local model loaders (e.g. the hosted API node) needs no demo models or demo sizes.
    local_models = not args.server and any(n.get("class_type") in LOADERS for n in workflow.values())
    build_demo = local_models and (args.demo or args.models is None)
    demo = build_demo or (local_models and demo_models_ready(models))
    steps, size = _demo_settings(args, workflow) if demo else (args.steps, args.size)
    workflow = apply_overrides(workflow, prompt=args.prompt, seed=args.seed, size=size, steps=steps,
                               settings=args.settings or [], images=args.images or [])
    if args.server:
        ignored = [f"--{name}" for name in ("models", "demo", "input") if getattr(args, name)]
        if ignored:
            say(f"{', '.join(ignored)}: ignored with --server (the server uses its own folders; pick models with --set).")
        runner = ServerRunner(args.server, args.out)
    else:
        if build_demo:
            say(f"Using the tiny demo models in {models}." if demo_models_ready(models) else
                 f"Building tiny demo models in {models} (once; about 25 MB, a few seconds)...")
            build_demo_models(models)
            say("The demo models have RANDOM weights: images look like coloured noise. Use --models with ComfyUI's "
                 "models folder (FLUX.2 [dev] files) for real images.")
        runner = LocalRunner(models, args.out, input_dir=args.input, demo=demo)
    paths = runner.run(workflow)
    if not paths:
        raise Flux2KitError("The workflow ran but saved no images (is its output a FLUX.2 Save Image node?).")
    return paths


def _demo_settings(args, workflow: dict):
    """(steps, size) for a quick CPU run on the demo models, where the command line does not set them."""
    from ..pipelines.demo_models import DEMO_SIZE, DEMO_STEPS

    steps, size = args.steps, args.size
    set_inputs = {setting.partition("=")[0].rpartition(".")[2] for setting in args.settings or []}
    if steps is None and "num_inference_steps" not in set_inputs and constant_inputs(workflow, "num_inference_steps"):
        steps = DEMO_STEPS
    if size is None and not {"width", "height"} & set_inputs and any(
            {"width", "height"} <= n["inputs"].keys() for n in workflow.values()):
        size = DEMO_SIZE
    if (steps, size) != (args.steps, args.size):
        what = ([f"{steps} steps"] if steps else []) + ([f"{size[0]}x{size[1]}"] if size else [])
        say(f"Demo settings for a quick CPU run: {' at '.join(what)} (--steps and --size change them).")
    return steps, size


def add_run_arguments(parser) -> None:
    """The ``flux2kit run`` options (cli.py builds the sub-command)."""
    add = parser.add_argument
    add("workflow", metavar="WORKFLOW.json", help="a workflow in API format (e.g. workflows/api/text_to_image.json)")
    add("--server", metavar="URL", help="run on this ComfyUI server (e.g. http://127.0.0.1:8188) instead of in-process")
    add("--models", metavar="DIR", help="ComfyUI's models folder for an in-process run (default: the tiny demo "
                                        "models in ./demo-models, built once)")
    add("--demo", action="store_true", help="run on the tiny random demo models (in --models DIR or ./demo-models): "
                                            "model names map to the demo files, 4 steps at 256x256 unless set")
    add("--out", default="./output", metavar="DIR", help="folder for the images (default: ./output)")
    add("--input", metavar="DIR", help="ComfyUI's input folder for LoadImage names (default: ./input)")
    add("--prompt", metavar="TEXT", help="the prompt of every node with a prompt input")
    add("--seed", type=int, metavar="N", help="the seed of every node with a seed input")
    add("--size", type=parse_size, metavar="WxH", help="width and height of every node that has them")
    add("--steps", type=int, metavar="N", help="num_inference_steps of every node that has it")
    add("--set", dest="settings", action="append", metavar="NODE.INPUT=VALUE",
        help="set one input; NODE is a node id, title or class type (repeatable)")
    add("--image", dest="images", action="append", metavar="NODE=PATH",
        help="a local image for a LoadImage node (a bare PATH fills the LoadImage nodes in id order; repeatable)")
