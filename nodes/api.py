"""FLUX.2 API: the hosted twin of Generate (Black Forest Labs or Oxen.ai) with the same shared inputs.

The API key is never an input: it comes from the environment (BFL_API_KEY, OXEN_API_KEY) or from
ComfyUI's settings (flux2kit > API keys, written by web/flux2kit_api.js into the user's
comfy.settings.json), so it stays out of workflows, prompts and image metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading

import numpy as np
import PIL.Image
import torch
from comfy_api.latest import io

from ..pipelines.hosted import providers as AP
from ..pipelines.errors import Flux2KitError
from ..pipelines.generation.request import check_prompt_or_images
from ..pipelines.hosted.errors import ApiError, Cancelled, redact
from ..pipelines.hosted.jobs import JobRunner, RetryPolicy
from ..pipelines.hosted.transport import host_of
from ..pipelines.parameters import MAX_PIXELS, MAX_SIDE, MEGAPIXEL, MIN_SIDE, OUTPUT_FORMATS, RESOLUTIONS, SIZE_MULTIPLE
from . import services
from .encode import images_input, ordered_images
from .sampling import generation_inputs
from .types import CATEGORY

API_DEFAULTS = {"num_inference_steps": 30, "guidance": 2.0}  # docs/parameters.md: the hosted model's defaults
SETTING_IDS = {"bfl": "Flux2Kit.API.BFLKey", "oxen": "Flux2Kit.API.OxenKey"}
BASE_URL_ENV = {"bfl": "FLUX2KIT_BFL_BASE_URL", "oxen": "FLUX2KIT_OXEN_BASE_URL"}
TRUSTED_HOSTS_ENV = "FLUX2KIT_API_TRUSTED_HOSTS"
PROVIDER_LABELS = {"bfl": "BFL", "oxen": "Oxen"}
POLICY = RetryPolicy()  # waits and retries; the node sets the deadline (tests swap in short waits)
MAX_CONCURRENT = 24  # BFL's documented concurrent-task limit per account


def model_key(provider: str, model: str) -> str:
    return f"{PROVIDER_LABELS[provider]} {model}"


def _model_choices() -> dict[str, tuple[str, str]]:
    return {model_key(p, m): (p, m) for p, cls in (("bfl", AP.BFL), ("oxen", AP.Oxen)) for m in cls.models}


MODELS = _model_choices()


def browser_table() -> dict:
    """The facts web/flux2kit_api.js needs to show the cost estimate and which inputs apply, from the same
    provider classes the node runs (served at /flux2kit/api_models, so there is one price list)."""
    return {
        "models": {key: AP.make_provider(p, m).browser_facts() for key, (p, m) in MODELS.items()},
        "size": {"megapixel": MEGAPIXEL, "resolutions": RESOLUTIONS, "multiple": SIZE_MULTIPLE, "min_side": MIN_SIDE,
                 "max_side": MAX_SIDE, "max_pixels": MAX_PIXELS},
    }


def _provider_inputs(provider: str, model: str = "") -> list:
    if provider == "bfl":
        inputs = [io.Int.Input("safety_tolerance", default=2, min=0, max=5,
                               tooltip="Black Forest Labs' moderation of input and output: 0 strictest, 5 most "
                                       "permissive (default 2).")]
        if model in AP.BFL.UPSAMPLING_MODELS:
            inputs.append(io.Boolean.Input(
                "prompt_upsampling", default=False,
                tooltip="Let BFL's server rewrite the prompt into a more detailed one before generating (BFL's own "
                        "default for this model is on; flux2kit sends off unless you turn it on, so the prompt you "
                        "write is the one that runs). To see and keep the rewritten text, use FLUX.2 Prompt Upsample."))
        return inputs
    return [
        io.Boolean.Input("disable_safety_checker", default=False,
                         tooltip="Oxen.ai: turn off the safety checker for generated images."),
        io.Combo.Input("mode", options=["queue", "sync"], default="queue",
                       tooltip="queue: submit, then poll (robust for long jobs; the default). sync: one request "
                               "that answers with the image."),
    ]


def model_input() -> io.DynamicCombo.Input:
    return io.DynamicCombo.Input("model", options=[io.DynamicCombo.Option(key, _provider_inputs(p, m))
                                                   for key, (p, m) in MODELS.items()],
                                 tooltip="Provider and model. BFL = Black Forest Labs (api.bfl.ai, key BFL_API_KEY); "
                                         "Oxen = Oxen.ai (hub.oxen.ai, key OXEN_API_KEY). Provider-specific "
                                         "inputs appear under the choice.")


def shared_inputs() -> list:
    """Generate's shared inputs (same names, ranges, options), with the hosted model's defaults."""
    inputs = generation_inputs()
    for inp in inputs:
        if inp.id in API_DEFAULTS:
            inp.default = API_DEFAULTS[inp.id]
        if inp.id == "num_inference_steps":
            inp.tooltip = ("Denoising steps (default 30). Sent where the model takes it: Oxen's models and BFL "
                           "flux-2-flex; BFL [pro], [max] and [klein] choose their own.")
        if inp.id == "guidance":
            inp.tooltip = ("Guidance (default 2.0; lower can look more natural). Sent where the model takes it: "
                           "Oxen's models and BFL flux-2-flex.")
        if inp.id in ("width", "height"):
            inp.tooltip += " BFL takes the exact size; Oxen takes the nearest aspect ratio and resolution."
        if inp.id == "batch_size":
            inp.tooltip = "Images per run, each a separate paid job; image i uses seed + i. Sent concurrently."
    return inputs


def _interrupted() -> bool:
    """ComfyUI's Cancel flag, peeked (not cleared) so worker threads can poll it."""
    try:
        import comfy.model_management as mm
    except Exception:
        return False
    return bool(mm.processing_interrupted())


def _settings_file() -> str | None:
    try:
        import folder_paths
        from comfy.cli_args import args
    except Exception:
        return None
    if getattr(args, "multi_user", False):
        return None  # the prompt does not say which user queued it: environment variables only
    return os.path.join(folder_paths.get_user_directory(), "default", "comfy.settings.json")


def api_key(provider: str) -> str:
    """The key from the environment, else from ComfyUI's settings; an error that says where to put it."""
    env = AP.PROVIDERS[provider].key_env
    key = os.environ.get(env, "").strip()
    if key:
        return key
    path = _settings_file()
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get(SETTING_IDS[provider])
        except (OSError, ValueError, AttributeError):
            value = None
        if isinstance(value, str) and value.strip():
            return value.strip()
    name = AP.PROVIDERS[provider].name
    raise Flux2KitError(f"No {name} API key. Set the environment variable {env} before starting ComfyUI, or enter it "
                        f"in ComfyUI's Settings > flux2kit > API keys (single-user ComfyUI only). The key is never a "
                        f"node input, so it stays out of workflows and image metadata.")


def _trusted_hosts(provider: str) -> list[str]:
    hosts = [h.strip() for h in os.environ.get(TRUSTED_HOSTS_ENV, "").split(",") if h.strip()]
    env_base = os.environ.get(BASE_URL_ENV[provider], "").strip()
    return hosts + ([host_of(env_base)] if env_base else [])


def _base_url(provider: str, value: str) -> tuple[str | None, str]:
    """The base URL to use (None: the provider's default) and where it came from, for messages."""
    if (value or "").strip():
        return value.strip(), "the base_url input"
    env = BASE_URL_ENV[provider]
    return os.environ.get(env, "").strip() or None, f"the environment variable {env}"


def to_image_tensor(images: list[PIL.Image.Image]) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, 3) in 0..1; a differing size is resized to the first image's (LANCZOS)."""
    size = images[0].size
    arrays = [np.asarray(im if im.size == size else im.resize(size, PIL.Image.Resampling.LANCZOS), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays) / 255.0)


def _money(usd: float | None) -> str:
    return "unknown" if usd is None else f"${usd:.3f}"


class APIGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitAPIGenerate",
            display_name="FLUX.2 API Generate (flux2kit)",
            category=CATEGORY,
            description="FLUX.2 on Black Forest Labs' or Oxen.ai's servers: the hosted twin of FLUX.2 Generate, with "
                        "the same inputs, so swapping one node moves a workflow. Needs an API key in the environment "
                        "(BFL_API_KEY, OXEN_API_KEY) or in Settings > flux2kit. Shows the estimated cost before "
                        "sending; each image is a paid job.",
            inputs=[
                model_input(),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Text or a JSON prompt. Name references by number ('the jacket from image 2'). "
                                        "Empty is allowed when references are connected."),
                images_input("Reference images, numbered in the order wired (batches count one per image); at most 8 "
                             "for these providers, downscaled to 1 MP each (4 MP for a single one)."),
                *shared_inputs(),
                io.Combo.Input("output_format", options=list(OUTPUT_FORMATS), default="webp",
                               tooltip="The format the provider makes. BFL makes jpeg or png (webp is sent as jpeg)."),
                io.Int.Input("output_quality", default=80, min=0, max=100,
                             tooltip="Quality of webp/jpeg from the provider (Oxen); not used for png or by BFL."),
                io.String.Input("base_url", default="", advanced=True,
                                tooltip="Optional endpoint override (e.g. https://api.eu.bfl.ai). Empty = the "
                                        "provider's default or FLUX2KIT_BFL_BASE_URL / FLUX2KIT_OXEN_BASE_URL. The key "
                                        "is sent only to the provider's own hosts, loopback, or hosts listed in "
                                        "FLUX2KIT_API_TRUSTED_HOSTS."),
                io.Int.Input("max_concurrent", default=4, min=1, max=MAX_CONCURRENT, advanced=True,
                             tooltip="Jobs in flight at once for a batch (BFL allows about 24 per account)."),
                io.Int.Input("timeout", default=600, min=10, max=3600, advanced=True,
                             tooltip="Seconds for the whole batch: submitting, polling and downloading stop then "
                                     "with a message (a job already sent may still finish and be charged)."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The generated images, in seed order."),
                io.String.Output(display_name="request_ids",
                                 tooltip="The provider's request / generation ids, one per line (for support or "
                                         "the provider's usage log)."),
                io.String.Output(display_name="seeds", tooltip="The seed of each image, one per line (seed + i)."),
                io.Float.Output(display_name="cost_usd",
                                tooltip="Cost in USD: as reported by the provider (BFL), else the estimate; -1 when "
                                        "unknown (Oxen publishes no per-image price)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, prompt, aspect_ratio, resolution, width, height, num_inference_steps, guidance, seed,
                batch_size, output_format, output_quality, base_url="", max_concurrent=4, timeout=600,
                images=None) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden else None
        choice = model.get("model") if isinstance(model, dict) else model
        if choice not in MODELS:
            raise Flux2KitError(f"Unknown model {choice!r}; choose one of {', '.join(MODELS)}.")
        provider_id, model_name = MODELS[choice]
        extras = model if isinstance(model, dict) else {}
        flat = ordered_images(images)
        check_prompt_or_images(prompt, flat)

        # everything is checked before anything is sent
        base, source = _base_url(provider_id, base_url)
        trusted = _trusted_hosts(provider_id)
        provider = AP.make_provider(provider_id, model_name, base, trusted, mode=extras.get("mode", "queue"))
        provider.check_base_url(trusted, source=source)
        request = AP.Request(prompt=prompt, images=flat, aspect_ratio=aspect_ratio, resolution=resolution,
                             width=width or 0, height=height or 0, num_inference_steps=num_inference_steps,
                             guidance=guidance, seed=seed, batch_size=batch_size, output_format=output_format,
                             output_quality=output_quality, safety_tolerance=extras.get("safety_tolerance", 2),
                             prompt_upsampling=bool(extras.get("prompt_upsampling", False)),
                             disable_safety_checker=extras.get("disable_safety_checker", False),
                             mode=extras.get("mode", "queue"))
        plan = provider.plan(request)
        key = api_key(provider_id)
        size = f"{plan.width}x{plan.height}, " if plan.width else ""
        estimate = "" if plan.estimated_usd is None else f"estimated {_money(plan.estimated_usd)} "
        header = f"{choice}: {batch_size} image{'s' if batch_size > 1 else ''}, {size}{estimate}({plan.pricing_note})"
        if plan.notes:
            header += "\n" + "\n".join(f"note: {n}" for n in plan.notes)
        services.show_text(node_id, header)
        services.log.info("flux2kit API: %s", header.replace("\n", "; "))

        results, warnings = cls._run(provider, key, plan, max_concurrent, timeout, node_id, header)

        pils = [AP.decode_image(r.image_bytes) for r in results]
        reported = [r.cost_usd for r in results]
        if all(c is not None for c in reported):
            cost, how = float(sum(reported)), f"reported by {provider.name}"
        elif plan.estimated_usd is not None:
            cost, how = plan.estimated_usd, "estimate"
        else:
            cost, how = -1.0, "unknown"
        ids = "\n".join(r.request_id or "" for r in results)
        seeds = "\n".join(str(r.seed) for r in results)
        done = (f"done: {len(results)} of {len(plan.jobs)} image(s), cost {_money(cost if cost >= 0 else None)} ({how}); "
                f"request ids: {ids.replace(chr(10), ', ')}")
        services.show_text(node_id, "\n".join([header, *warnings, done]))
        # the browser shows the cost of the last run next to the estimate (web/flux2kit_api.js)
        ui = {"flux2kit_cost": [{"usd": cost if cost >= 0 else None, "how": how, "images": len(results),
                                 "requested": len(plan.jobs)}]}
        return io.NodeOutput(to_image_tensor(pils), ids, seeds, cost, ui=ui)

    @classmethod
    def _run(cls, provider, key, plan, max_concurrent, timeout, node_id, header):
        """Run the jobs in a worker thread; this thread shows progress and watches Cancel."""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()  # set here when ComfyUI's progress hook raised its interrupt (and cleared the flag)
        policy = dataclasses.replace(POLICY, deadline=float(timeout))
        runner = JobRunner(provider, key, policy=policy, limit=max_concurrent,
                           should_cancel=lambda: stop.is_set() or _interrupted(),
                           on_status=lambda i, s, p: events.put((i, s, p)),
                           log=lambda m: services.log.info("flux2kit API: %s", redact(m, [key])))
        box: dict = {}

        def work():
            try:
                box["results"] = runner.run(plan.jobs, allow_partial=True)  # paid images are never thrown away
            except BaseException as e:  # noqa: BLE001 - handed to the node's thread
                box["error"] = e

        n = len(plan.jobs)
        try:
            import comfy.utils

            bar = comfy.utils.ProgressBar(100 * n)
        except Exception:
            bar = None
        progress, statuses = [0.0] * n, ["waiting"] * n
        thread = threading.Thread(target=work, name="flux2kit-api-batch", daemon=True)
        thread.start()
        while thread.is_alive() or not events.empty():
            thread.join(0.05)
            changed = False
            while not events.empty():
                i, status, p = events.get()
                statuses[i] = status
                if p is not None:
                    progress[i] = max(progress[i], p)
                changed = True
            if changed:
                if bar is not None:
                    try:  # ComfyUI's hook raises its interrupt here on Cancel
                        bar.update_absolute(int(sum(progress) * 100), 100 * n)
                    except BaseException:
                        stop.set()
                        thread.join()
                        cls._report_cancel(runner, provider, node_id, header)
                        raise
                services.show_text(node_id, header.splitlines()[0] + "\n" + "\n".join(
                    f"image {i + 1} (seed {job.seed}): {statuses[i]}" for i, job in enumerate(plan.jobs)))
        error = box.get("error")
        if isinstance(error, Cancelled):
            note = cls._report_cancel(runner, provider, node_id, header)
            services.raise_if_cancelled()  # ComfyUI's own interrupt: the run shows as cancelled
            raise Flux2KitError("Cancelled while waiting for the provider. Jobs already sent may still finish and be "
                                "charged" + (f" ({note})" if note else "") + "; " + provider.where_to_check())
        if isinstance(error, ApiError):
            raise Flux2KitError(redact(str(error), [key])) from None
        if error is not None:
            raise Flux2KitError(redact(f"{provider.name}: {type(error).__name__}: {error}", [key])) from None
        failures = getattr(runner, "failures", {})
        if failures:
            lines = [f"WARNING: image {i + 1} (seed {plan.jobs[i].seed}) failed: {redact(str(e), [key])}"
                     for i, e in failures.items()]
            services.log.warning("flux2kit API: %s", "; ".join(lines))
            box["warnings"] = lines
        return box["results"], box.get("warnings", [])

    @staticmethod
    def _report_cancel(runner, provider, node_id, header) -> str:
        """After Cancel: name the accepted jobs (they may still be charged) on the node and in the log."""
        note = runner.unfinished_note()
        if note:
            services.log.warning("flux2kit API: cancelled; %s %s", note, provider.where_to_check())
            services.show_text(node_id, header.splitlines()[0] + f"\ncancelled: {note} {provider.where_to_check()}")
        return note


NODES = [APIGenerate]
