"""The hosted FLUX.2 providers: how the shared generation inputs (docs/parameters.md) become each provider's request.

Black Forest Labs (api.bfl.ai): POST {base}/v1/{model} with header ``x-key``; width and height
(multiples of 16, at most 4 MP), references as ``input_image``, ``input_image_2`` .. ``_8``
(base64), ``safety_tolerance`` 0-5, ``output_format`` jpeg|png; [flex] also takes ``steps``,
``guidance`` and ``prompt_upsampling`` (BFL's published FLUX.2 schemas list it only for [flex], where it
defaults to true server-side; flux2kit always sends it there, false unless asked, so a prompt is not
rewritten unseen. Core ComfyUI's deprecated [pro]/[max] nodes sent it too; its current FLUX.2 node and
BFL's [pro]/[max]/[klein] schemas do not, so flux2kit does not). The answer holds ``polling_url``; a poll says Pending / Reasoning / Generating /
Ready / Error / Request Moderated / Content Moderated / Task not found; Ready -> ``result.sample``.

Oxen.ai (hub.oxen.ai/api/ai): header ``Authorization: Bearer``; sync POST /images/generate
(or /images/edit with references) answering ``{"images": [{"b64_json"|"url"}]}``, or queue mode
POST /queue + GET /queue/{id}; inputs aspect_ratio, resolution, num_inference_steps, guidance,
output_format webp|jpg|png, output_quality, disable_safety_checker, input_image as data URIs.
"""

from __future__ import annotations

import base64
import io
import json
import math
import urllib.parse
from dataclasses import dataclass, field

import PIL.Image

from ..errors import Flux2KitError
from ..generation.references import check_reference, to_pil, to_rgb
from ..parameters import ASPECT_RATIOS, MEGAPIXEL, RESOLUTIONS, resolve_size
from .errors import ApiError
from .jobs import PollState, Submitted
from .transport import host_of, is_loopback


@dataclass
class Request:
    """The node's inputs (docs/parameters.md names) plus the provider-specific extras."""

    prompt: str = ""
    images: list = field(default_factory=list)  # PIL images or ComfyUI IMAGE items, reference order
    aspect_ratio: str = "1:1"
    resolution: str = "1 MP"
    width: int = 0
    height: int = 0
    num_inference_steps: int = 30
    guidance: float = 2.0
    seed: int = 0
    batch_size: int = 1
    output_format: str = "webp"
    output_quality: int = 80
    safety_tolerance: int = 2  # BFL
    prompt_upsampling: bool = False  # BFL models in BFL.UPSAMPLING_MODELS: the server rewrites the prompt first
    disable_safety_checker: bool = False  # Oxen
    mode: str = "sync"  # Oxen: sync | queue


@dataclass
class Job:
    """One image of a batch, ready to send."""

    index: int
    seed: int
    body: dict
    path: str  # appended to the base URL
    estimated_usd: float | None = None


@dataclass
class Plan:
    jobs: list[Job]
    width: int | None  # the size asked for, when the provider takes an exact size
    height: int | None
    estimated_usd: float | None  # the whole batch; None = unknown
    pricing_note: str
    notes: list[str]  # what was mapped or ignored, for the node's status text


def _encode_png(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def prepare_references(images, *, max_count: int, max_pixels: int, single_max_pixels: int,
                       provider: str) -> list[PIL.Image.Image]:
    """RGB references within the provider's limits (LANCZOS downscale; never upscaled)."""
    pils = [to_pil(im) for im in images]
    if len(pils) > max_count:
        raise Flux2KitError(f"{len(pils)} reference images are wired; {provider} takes at most {max_count}. "
                            f"Remove {len(pils) - max_count}.")
    limit = single_max_pixels if len(pils) == 1 else max_pixels
    out = []
    for number, pil in enumerate(pils, start=1):
        check_reference(pil, number)
        w, h = pil.size
        if w * h > limit:
            s = math.sqrt(limit / (w * h))
            pil = pil.resize((max(1, int(w * s)), max(1, int(h * s))), PIL.Image.Resampling.LANCZOS)
        out.append(to_rgb(pil))
    return out


def _ceil_mp(pixels: float) -> int:
    return max(1, math.ceil(pixels / MEGAPIXEL - 1e-9))


class Provider:
    """The mapping for one provider. ``trusts(url)`` says which hosts may see the key."""

    name = ""
    a_host = "a provider's host"  # with its article, for messages
    default_base = ""
    official_hosts: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    key_env = ""
    QUALITY_FORMATS: tuple[str, ...] = ()  # output formats for which output_quality is sent
    PRICES: dict[str, tuple[float, float]] = {}  # USD per image: (first output MP, each further output or input MP)
    download_needs_key = False  # result URLs are signed; only some providers want the key (and only trusted hosts get it)
    billing_url = ""

    def __init__(self, base_url: str | None = None, extra_trusted_hosts=()):
        self.base_url = (base_url or self.default_base).rstrip("/")
        self._trusted = {host_of(self.base_url)} | {h.lower() for h in extra_trusted_hosts if h}

    def trusts(self, url: str) -> bool:
        """Hosts that may see the key, and only over https (plain http to loopback only)."""
        host = host_of(url)
        if urllib.parse.urlsplit(url).scheme != "https" and not is_loopback(host):
            return False
        return host in self._trusted or is_loopback(host) or any(
            host == h or host.endswith("." + h) for h in self.official_hosts)

    def check_base_url(self, allowed_hosts=(), source: str = "the base_url input") -> None:
        """Refuse a base URL override that would send the key somewhere unexpected.

        ``source`` says where the URL came from (the node's input or an environment variable), so the message
        points at the place to fix.
        """
        parts = urllib.parse.urlsplit(self.base_url)
        host = (parts.hostname or "").lower()
        fix = "leave base_url empty" if source == "the base_url input" else f"change or unset {source.split()[-1]}"
        if parts.scheme not in ("http", "https") or not host:
            raise Flux2KitError(f"The base URL {self.base_url!r} (from {source}) is not an http(s) URL. {fix[0].upper()}"
                                f"{fix[1:]} for {self.default_base}.")
        official = any(host == h or host.endswith("." + h) for h in self.official_hosts)
        allowed = official or is_loopback(host) or host in {h.lower() for h in allowed_hosts if h}
        if not allowed:
            raise Flux2KitError(
                f"The base URL (from {source}) points at {host}, which is not {self.a_host}, so the API key is not "
                f"sent there (a shared workflow could otherwise collect keys). If you trust it, add it to the "
                f"environment variable FLUX2KIT_API_TRUSTED_HOSTS (comma-separated) and restart ComfyUI, or {fix}.")
        if parts.scheme != "https" and not is_loopback(host):
            raise Flux2KitError(f"The base URL {self.base_url!r} (from {source}) uses plain http; the API key must "
                                f"travel over https. Use https://{host}, or {fix}.")

    @property
    def takes_steps_and_guidance(self) -> bool:
        """Whether this model uses num_inference_steps and guidance (others choose their own)."""
        return True

    def browser_facts(self) -> dict:
        """What the browser needs to show the estimate and which inputs apply (web/lib/hosted.js reads it)."""
        return {"provider": self.name, "price": list(self.PRICES[self.model]) if self.model in self.PRICES else None,
                "exact_size": self.exact_size, "takes_steps_and_guidance": self.takes_steps_and_guidance,
                "quality_formats": list(self.QUALITY_FORMATS), "max_references": self.MAX_REFERENCES,
                "reference_pixels": self.REFERENCE_PIXELS, "single_reference_pixels": self.SINGLE_REFERENCE_PIXELS,
                "resolutions": list(getattr(self, "RESOLUTIONS", RESOLUTIONS))}

    def auth_headers(self, key: str) -> dict:
        raise NotImplementedError

    def where_to_check(self, request_id: str | None = None) -> str:
        raise NotImplementedError

    def busy_hint(self) -> str:
        return "The provider is busy or limits concurrent jobs; lower max_concurrent or try again later."

    def http_error(self, status: int, body: str, stage: str, rid: str | None) -> ApiError:
        what = {"submit": "the request", "poll": f"polling request {rid}"}.get(stage, stage)
        # only a refused submit is certainly free; a refused poll is about a job that was accepted
        free = " Nothing was charged." if stage == "submit" else (
            f" The job was accepted and may still be charged; {self.where_to_check(rid)}")
        if status in (401, 403):
            return ApiError(f"{self.name} refused {what} (HTTP {status}: {body}): the API key is missing, wrong or "
                            f"revoked. Set {self.key_env} (or the key in ComfyUI's settings: flux2kit) and restart if "
                            f"you changed the environment.", kind="auth", status=status, request_id=rid)
        if status == 402:
            return ApiError(f"{self.name} refused {what} (HTTP 402: {body}): the account has no credits left. Add "
                            f"credits ({self.billing_url}) and run again.{free}", kind="credits",
                            status=status, request_id=rid)
        if status in (400, 422):
            return ApiError(f"{self.name} rejected {what} as invalid (HTTP {status}): {body}. Fix the input it names "
                            f"and run again.{free}", kind="invalid", status=status, request_id=rid)
        return ApiError(f"{self.name} answered HTTP {status} to {what}: {body}.", status=status, request_id=rid)

    # Each provider also defines: plan(Request) -> Plan; submit_request(Job) -> (method, url, body bytes);
    # parse_submit(json, Job) -> Submitted; parse_poll(json) -> PollState; failure(PollState, request id) -> ApiError.


class BFL(Provider):
    name = "Black Forest Labs"
    a_host = "a Black Forest Labs host"
    default_base = "https://api.bfl.ai"
    official_hosts = ("bfl.ai", "bfl.ml")
    models = ("flux-2-pro", "flux-2-pro-preview", "flux-2-max", "flux-2-flex", "flux-2-klein-4b", "flux-2-klein-9b")
    key_env = "BFL_API_KEY"
    billing_url = "https://dashboard.bfl.ai"
    MAX_REFERENCES = 8
    REFERENCE_PIXELS = MEGAPIXEL  # each, with several references (diffusers' rule; BFL bills per input MP)
    SINGLE_REFERENCE_PIXELS = 4 * MEGAPIXEL  # a lone reference (BFL accepts up to 4 MP)
    # USD: (first output MP, each further output MP and each input MP). docs.bfl.ai/quick_start/pricing and
    # BFL's bfl-api guide, 2026-11; [pro-preview] is not listed.
    PRICES = {"flux-2-pro": (0.03, 0.015), "flux-2-max": (0.07, 0.03), "flux-2-flex": (0.05, 0.05),
              "flux-2-klein-4b": (0.014, 0.001), "flux-2-klein-9b": (0.015, 0.002)}
    FORMATS = {"png": "png", "jpeg": "jpeg", "webp": "jpeg"}  # BFL makes jpeg or png only
    UPSAMPLING_MODELS = ("flux-2-flex",)  # the FLUX.2 models whose published schema has prompt_upsampling

    def __init__(self, model: str, base_url: str | None = None, extra_trusted_hosts=()):
        super().__init__(base_url, extra_trusted_hosts)
        if model not in self.models:
            raise Flux2KitError(f"Unknown Black Forest Labs model {model!r}; use one of {', '.join(self.models)}.")
        self.model = model

    exact_size = True  # takes width and height

    @property
    def takes_steps_and_guidance(self) -> bool:
        return self.model == "flux-2-flex"

    def auth_headers(self, key):
        return {"x-key": key}

    def where_to_check(self, request_id=None):
        rid = f" for request {request_id}" if request_id else ""
        return f"Check the usage log on {self.billing_url}{rid} before running again."

    def busy_hint(self):
        return ("Black Forest Labs limits concurrent tasks (about 24 per account); lower max_concurrent, wait for "
                "other jobs, or try again later.")

    def plan(self, req: Request) -> Plan:
        refs = prepare_references(req.images, max_count=self.MAX_REFERENCES, max_pixels=self.REFERENCE_PIXELS,
                                  single_max_pixels=self.SINGLE_REFERENCE_PIXELS, provider=self.name)
        width, height = resolve_size(req.aspect_ratio, req.resolution, req.width or None, req.height or None,
                                     to_pil(req.images[0]).size if req.images else None)
        if not 0 <= req.safety_tolerance <= 5:
            raise Flux2KitError(f"safety_tolerance must be 0-5 (0 strictest), got {req.safety_tolerance}.")
        notes = []
        fmt = self.FORMATS[req.output_format]
        if req.output_format == "webp":
            notes.append("BFL makes jpeg or png: webp requested, jpeg used")
        if req.output_format != "png":
            notes.append("output_quality is not used by BFL")
        if not self.takes_steps_and_guidance:
            notes.append(f"num_inference_steps and guidance are not used by {self.model} (only flux-2-flex takes them)")
        base = {"prompt": req.prompt, "width": width, "height": height, "safety_tolerance": int(req.safety_tolerance),
                "output_format": fmt}
        if self.takes_steps_and_guidance:
            base["steps"], base["guidance"] = int(req.num_inference_steps), float(req.guidance)
        if self.model in self.UPSAMPLING_MODELS:
            base["prompt_upsampling"] = bool(req.prompt_upsampling)
        elif req.prompt_upsampling:
            notes.append(f"prompt_upsampling is not taken by {self.model} (only {', '.join(self.UPSAMPLING_MODELS)}); "
                         "not sent")
        for i, ref in enumerate(refs):
            base["input_image" if i == 0 else f"input_image_{i + 1}"] = base64.b64encode(_encode_png(ref)).decode("ascii")
        price = self.PRICES.get(self.model)
        each = None
        if price:
            first, extra = price
            in_mp = math.ceil(sum(r.size[0] * r.size[1] for r in refs) / MEGAPIXEL - 1e-9) if refs else 0
            each = first + extra * (_ceil_mp(width * height) - 1) + extra * in_mp
            note = (f"estimate ${each:.3f} per image: ${first:g} first MP + ${extra:g} per further output or input MP "
                    f"(BFL price list)")
        else:
            note = f"price of {self.model} unknown (not on BFL's price list read for flux2kit); BFL reports it after submit"
        jobs = [Job(i, (req.seed + i) % 2**64, {**base, "seed": (req.seed + i) % 2**64}, f"/v1/{self.model}", each)
                for i in range(req.batch_size)]
        total = each * req.batch_size if each is not None else None
        return Plan(jobs, width, height, total, note, notes)

    def submit_request(self, job):
        return "POST", self.base_url + job.path, json.dumps(job.body).encode()

    def parse_submit(self, data, job):
        if not isinstance(data, dict) or not data.get("polling_url") and not data.get("id"):
            raise KeyError("polling_url")
        rid = str(data.get("id") or "") or None
        poll = data.get("polling_url") or f"{self.base_url}/v1/get_result?id={urllib.parse.quote(rid)}"
        cost = data.get("cost")
        return Submitted(rid, poll, float(cost) / 100.0 if isinstance(cost, (int, float)) else None)

    def parse_poll(self, data):
        status = str(data["status"])
        low = status.lower()
        result = data.get("result") or {}
        progress = data.get("progress")
        if isinstance(progress, (int, float)):
            progress = float(progress) / (100.0 if progress > 1 else 1.0)  # BFL reports 0-100 (or 0-1)
        else:
            progress = None
        if low == "ready":
            return PollState("ready", status, result_url=result.get("sample") if isinstance(result, dict) else None,
                             progress=1.0)
        if low not in ("error", "failed", "request moderated", "content moderated", "task not found"):
            # Pending, Reasoning, Generating, or a status BFL adds later: the job may still run and be charged,
            # so keep polling (the deadline bounds it) instead of telling the user to run it again
            return PollState("pending", status, progress=progress)
        message = data.get("details") or data.get("error") or result
        text = json.dumps(message) if isinstance(message, (dict, list)) else str(message or "")
        return PollState("failed", status, message=text)

    def failure(self, state: PollState, rid):
        low = state.status.lower()
        detail = f" Details: {state.message}." if state.message and state.message not in ("{}", "None") else ""
        if low == "request moderated":
            return ApiError(f"Black Forest Labs: request {rid} was Request Moderated: the prompt or a reference image "
                            f"was flagged before generation.{detail} Change the prompt or references, or raise "
                            f"safety_tolerance (0-5, default 2).", kind="moderated", request_id=rid)
        if low == "content moderated":
            return ApiError(f"Black Forest Labs: request {rid} was Content Moderated: the generated image was flagged "
                            f"and withheld.{detail} Rephrase the prompt, change the seed, or raise safety_tolerance.",
                            kind="moderated", request_id=rid)
        if low == "task not found":
            return ApiError(f"Black Forest Labs: request {rid}: Task not found. The task expired or belongs to another "
                            f"region or key; run again.{detail}", kind="not_found", request_id=rid)
        return ApiError(f"Black Forest Labs: request {rid} failed with status '{state.status}'.{detail} Try again; if "
                        f"it keeps failing, check {self.billing_url} (usage log, service status).", kind="failed",
                        request_id=rid)


class Oxen(Provider):
    name = "Oxen.ai"
    a_host = "an Oxen.ai host"
    default_base = "https://hub.oxen.ai/api/ai"
    official_hosts = ("oxen.ai",)
    # flux-2-pro: Oxen.ai's model page (its request parameters: docs/parameters.md). The others appear in Oxen's
    # docs; that they take the same inputs as flux-2-pro is an assumption (their own schema: GET /models/{id}).
    models = ("flux-2-pro", "flux-2-flex", "flux-2-dev", "black-forest-labs-flux-2-klein-4b")
    key_env = "OXEN_API_KEY"
    download_needs_key = True  # queue results live in the user's account on hub.oxen.ai
    billing_url = "https://www.oxen.ai"
    MAX_REFERENCES = 8
    REFERENCE_PIXELS = MEGAPIXEL
    SINGLE_REFERENCE_PIXELS = 4 * MEGAPIXEL
    RESOLUTIONS = ("0.5 MP", "1 MP", "2 MP")  # the model page's list
    FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
    QUALITY_FORMATS = ("webp", "jpeg")
    exact_size = False  # takes aspect_ratio and resolution

    def __init__(self, model: str, base_url: str | None = None, extra_trusted_hosts=(), mode: str = "sync"):
        super().__init__(base_url, extra_trusted_hosts)
        if model not in self.models:
            raise Flux2KitError(f"Unknown Oxen.ai model {model!r}; use one of {', '.join(self.models)}.")
        if mode not in ("sync", "queue"):
            raise Flux2KitError(f"Oxen.ai mode must be sync or queue, got {mode!r}.")
        self.model, self.mode = model, mode

    @property
    def sync_submit(self) -> bool:
        """The submit's answer is the image (it takes the whole generation)."""
        return self.mode == "sync"

    def auth_headers(self, key):
        return {"Authorization": f"Bearer {key}"}

    def where_to_check(self, request_id=None):
        rid = f" (generation {request_id})" if request_id else ""
        return f"Check your generations and usage on {self.billing_url}{rid} before running again."

    def plan(self, req: Request) -> Plan:
        refs = prepare_references(req.images, max_count=self.MAX_REFERENCES, max_pixels=self.REFERENCE_PIXELS,
                                  single_max_pixels=self.SINGLE_REFERENCE_PIXELS, provider=self.name)
        notes = []
        aspect, resolution = req.aspect_ratio, req.resolution
        if aspect == "match_input_image" and not refs and not (req.width and req.height):  # a set size overrides it
            raise Flux2KitError("aspect_ratio 'match_input_image' needs a reference image; connect image 1 or pick "
                                "a ratio.")
        if req.width or req.height:
            w, h = resolve_size(req.aspect_ratio, req.resolution, req.width or None, req.height or None, None)
            aspect, resolution = nearest_aspect(w / h), nearest_resolution(w * h, self.RESOLUTIONS)
            notes.append(f"Oxen takes aspect_ratio and resolution, not an exact size: {w}x{h} sent as {aspect}, "
                         f"{resolution}")
        if resolution not in self.RESOLUTIONS:
            new = nearest_resolution(RESOLUTIONS[resolution] * MEGAPIXEL, self.RESOLUTIONS)
            notes.append(f"Oxen's {self.model} offers {', '.join(self.RESOLUTIONS)}: {resolution} sent as {new}")
            resolution = new
        body = {"model": self.model, "prompt": req.prompt, "aspect_ratio": aspect, "resolution": resolution,
                "num_inference_steps": int(req.num_inference_steps), "guidance": float(req.guidance),
                "output_format": self.FORMATS[req.output_format], "output_quality": int(req.output_quality),
                "disable_safety_checker": bool(req.disable_safety_checker)}
        if refs:
            body["input_image"] = ["data:image/png;base64," + base64.b64encode(_encode_png(r)).decode("ascii")
                                   for r in refs]
        if self.mode == "sync":
            body["response_format"] = "b64_json"  # the image comes with the answer: nothing to expire
            path = "/images/edit" if refs else "/images/generate"
        else:
            body["num_generations"] = 1  # one job per seed, so image i uses seed + i
            path = "/queue"
        jobs = [Job(i, (req.seed + i) % 2**64, {**body, "seed": (req.seed + i) % 2**64}, path, None)
                for i in range(req.batch_size)]
        note = "cost unknown: Oxen.ai's model page lists no price; see your usage on oxen.ai"
        return Plan(jobs, None, None, None, note, notes)

    def submit_request(self, job):
        return "POST", self.base_url + job.path, json.dumps(job.body).encode()

    def parse_submit(self, data, job):
        if self.mode == "sync":
            images = data["images"]
            first = images[0]
            rid = data.get("id") or data.get("generation_id")
            if first.get("b64_json"):
                raw = first["b64_json"]
                raw = raw.split(",", 1)[1] if raw.startswith("data:") else raw
                state = PollState("ready", "succeeded", image_bytes=base64.b64decode(raw))
            elif first.get("url"):
                state = PollState("ready", "succeeded", result_url=first["url"])
            else:
                raise KeyError("images[0]")
            return Submitted(str(rid) if rid else None, None, None, state)
        gen = data["generations"][0]
        gid = str(gen["generation_id"])
        return Submitted(gid, f"{self.base_url}/queue/{urllib.parse.quote(gid)}", None)

    def parse_poll(self, data):
        status = str(data["status"])
        low = status.lower()
        if low in ("succeeded", "completed", "success"):
            url = data.get("result_url") or data.get("output_url")
            images = data.get("images") or []
            if not url and images:
                url = images[0].get("url")
            return PollState("ready", status, result_url=url, progress=1.0)
        if low not in ("failed", "error", "cancelled", "canceled"):
            return PollState("pending", status)  # queued, processing, ... or a new word: still running
        return PollState("failed", status, message=str(data.get("error_message") or data.get("error") or ""))

    def failure(self, state, rid):
        detail = f": {state.message}" if state.message else ""
        if state.status.lower() in ("cancelled", "canceled"):
            return ApiError(f"Oxen.ai: generation {rid} was cancelled{detail}. Run again.", kind="failed", request_id=rid)
        flagged = any(w in state.message.lower() for w in ("safety", "nsfw", "moderat"))
        hint = "If it was flagged by the safety checker, rephrase the prompt or change the references. " if flagged else ""
        return ApiError(f"Oxen.ai: generation {rid} {state.status}{detail}. {hint}Try again; if it keeps failing, "
                        f"check your generations on {self.billing_url}.", kind="failed", request_id=rid)


def nearest_aspect(ratio: float) -> str:
    choices = [a for a in ASPECT_RATIOS if a != "match_input_image"]
    return min(choices, key=lambda a: abs(math.log(ratio) - math.log(int(a.split(":")[0]) / int(a.split(":")[1]))))


def nearest_resolution(pixels: float, choices) -> str:
    return min(choices, key=lambda r: abs(math.log(pixels / (RESOLUTIONS[r] * MEGAPIXEL))))


PROVIDERS = {"bfl": BFL, "oxen": Oxen}


def make_provider(provider: str, model: str, base_url: str | None = None, extra_trusted_hosts=(), mode: str = "sync"):
    if provider == "bfl":
        return BFL(model, base_url, extra_trusted_hosts)
    if provider == "oxen":
        return Oxen(model, base_url, extra_trusted_hosts, mode)
    raise Flux2KitError(f"Unknown provider {provider!r}; use bfl or oxen.")


def decode_image(data: bytes) -> PIL.Image.Image:
    """The provider's image bytes (png, jpeg or webp) as an RGB PIL image."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:
        raise Flux2KitError(f"The provider returned something that is not an image ({len(data)} bytes; {e}). "
                            f"Try again; if it repeats, report it to the provider.") from None
    return to_rgb(image)
