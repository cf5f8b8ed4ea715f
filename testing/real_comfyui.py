"""A real ComfyUI server for integration tests: started on 127.0.0.1 with flux2kit and the demo models.

``comfyui_server(root)`` (a context manager; the session fixture ``comfyui`` in tests/conftest.py uses it)
checks that ComfyUI's Python has flux2kit's requirements (requirements.txt; it raises ``MissingRequirements``
with the pip command otherwise: GGUF needs gguf and accelerate there), builds the tiny demo models once into ``root/models``, points ComfyUI at them with an
extra_model_paths.yaml, keeps input/output/temp/user folders (and ComfyUI's detail log and database)
in ``root``, gives the server its own custom_nodes folder (``root/custom_nodes/flux2kit``, a symlink to this
repository; ComfyUI's ``--base-directory``), so the shared checkout's ``custom_nodes`` is never touched and
several worktrees can test at once, starts ``$COMFYUI_PYTHON main.py --cpu`` on a free port and stops it at
the end.

HTTP goes through flux2kit's one ComfyUI client (``cli.comfy_client.ComfyClient``). Runs are followed
by polling ``/history/{prompt_id}``: its ``status.messages`` holds the same events as the websocket,
``execution_cached`` included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

from ..cli.comfy_client import ComfyClient, Refused, Unreachable

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120.0
RUN_TIMEOUT = 180.0
# Extra model files the fixture writes next to the demo models.
# ComfyUI's single-file VAE loader hard-codes the encoder width (ch=128, ch_mult 1,2,4,4, two resnets
# per level), so the tiny demo VAE does not load there; this random VAE has the real FLUX.2 encoder
# shape and a narrow decoder (ComfyUI infers the decoder width), which both loaders accept.
COMFY_VAE = "vae/flux2-vae-comfy-shape-random.safetensors"
NOT_A_MODEL = "diffusion_models/not_a_flux2_model.safetensors"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ComfyUIUnavailable(Exception):
    """COMFYUI_PATH is not set: the real-ComfyUI tests skip."""


class ComfyUISetupError(RuntimeError):
    """COMFYUI_PATH is set but the setup is broken: the real-ComfyUI tests fail, with what to fix."""


class MissingRequirements(ComfyUISetupError):
    """ComfyUI's Python lacks some of flux2kit's requirements: the message names them and the install command."""


class ComfyUIError(RuntimeError):
    """The server answered with an HTTP error; ``status`` and ``body`` (parsed JSON when possible)."""

    def __init__(self, method: str, path: str, status: int, body):
        text = body if isinstance(body, str) else json.dumps(body)
        super().__init__(f"{method} {path} -> HTTP {status}: {text[:2000]}")
        self.status = status
        self.body = body


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    return Path(value).resolve() if value else None


def comfyui_python(path: Path) -> str:
    return os.environ.get("COMFYUI_PYTHON") or str(path.parent / "comfyui-venv" / "bin" / "python")


def requirements() -> dict[str, str]:
    """flux2kit's requirements as ComfyUI-Manager installs them (requirements.txt): distribution name -> line."""
    found = {}
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found[re.match(r"[A-Za-z0-9._-]+", line).group(0)] = line
    return found


_FIND_MISSING = """
import importlib.metadata, sys
for name in sys.argv[1:]:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        print(name)
"""


def missing_requirements(python: str) -> list[str]:
    """The requirement lines ``python`` (ComfyUI's) has no distribution for, e.g. ``gguf>=0.19``."""
    wanted = requirements()
    result = subprocess.run([python, "-c", _FIND_MISSING, *wanted], capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise RuntimeError(f"{python} could not list its packages:\n{result.stderr[-2000:]}")
    return [wanted[name] for name in result.stdout.split()]


def check_requirements(python: str) -> None:
    """Refuse, naming what to install, when ComfyUI's Python cannot run flux2kit (a GGUF file needs gguf and
    accelerate there, for instance); the pack itself would load and fail only on the first such file."""
    missing = missing_requirements(python)
    if missing:
        quoted = " ".join(f"'{line}'" for line in missing)
        raise MissingRequirements(
            f"ComfyUI's Python ({python}) lacks flux2kit's requirements {', '.join(missing)} (requirements.txt, "
            f"what ComfyUI-Manager installs). Install them there:\n    {python} -m pip install {quoted}\n"
            "(see DEVELOPERS.md, 'Tests against a real ComfyUI').")


# What ComfyUI's Python must import: ComfyUI's own requirements and this pack's.
REQUIRED_MODULES = ("torch", "aiohttp", "yaml", "safetensors", "diffusers", "transformers")
_checked: set[tuple[str, str]] = set()  # (checkout, Python) pairs that passed, checked once per process


def check_setup(comfyui: Path | None = None, python: str | None = None) -> tuple[Path, str]:
    """(ComfyUI checkout, its Python). COMFYUI_PATH unset: ComfyUIUnavailable (skip). Set but unusable (no
    main.py, the Python missing or without ComfyUI's requirements): ComfyUISetupError saying what to fix."""
    comfyui = comfyui or comfyui_path()
    if comfyui is None:
        raise ComfyUIUnavailable("COMFYUI_PATH is not set")
    if not (comfyui / "main.py").is_file():
        raise ComfyUISetupError(f"COMFYUI_PATH={comfyui} has no main.py. Point COMFYUI_PATH at a ComfyUI checkout "
                                "(the folder that holds main.py), or unset it to skip the real-ComfyUI tests.")
    given = python or os.environ.get("COMFYUI_PYTHON")
    python = python or comfyui_python(comfyui)
    where = "COMFYUI_PYTHON" if given else "the default Python, $COMFYUI_PATH/../comfyui-venv/bin/python,"
    if not os.path.exists(python):
        raise ComfyUISetupError(f"ComfyUI's Python {python} ({where}) does not exist. Set COMFYUI_PYTHON to the "
                                "Python of ComfyUI's environment (DEVELOPERS.md, 'Tests against a real ComfyUI').")
    if (str(comfyui), python) not in _checked:
        try:
            result = subprocess.run([python, "-c", "import " + ", ".join(REQUIRED_MODULES)], capture_output=True,
                                    text=True, timeout=300, cwd=comfyui)
        except OSError as e:
            problem = str(e)
        else:
            lines = result.stderr.strip().splitlines()
            problem = None if result.returncode == 0 else (lines[-1] if lines else f"exit code {result.returncode}")
        if problem:
            raise ComfyUISetupError(f"ComfyUI's Python {python} ({where}) cannot import ComfyUI's requirements "
                                    f"({problem}). Set COMFYUI_PYTHON to the Python of ComfyUI's environment, with "
                                    "ComfyUI's requirements and this package's installed (DEVELOPERS.md).")
        _checked.add((str(comfyui), python))
    return comfyui, python


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One finished prompt, from /history."""

    def __init__(self, prompt_id: str, entry: dict):
        self.prompt_id = prompt_id
        self.entry = entry
        self.status = entry.get("status") or {}
        self.messages = self.status.get("messages") or []
        self.outputs = entry.get("outputs") or {}

    @property
    def ok(self) -> bool:
        return self.status.get("status_str") == "success" and bool(self.status.get("completed"))

    def event(self, name: str) -> dict | None:
        for ev, data in self.messages:
            if ev == name:
                return data
        return None

    @property
    def cached(self) -> set[str]:
        data = self.event("execution_cached")
        return set(data["nodes"]) if data else set()

    @property
    def error(self) -> dict | None:
        return self.event("execution_error")

    def images(self) -> list[dict]:
        """``{"filename", "subfolder", "type"}`` of every saved image, by node id order."""
        found = []
        for node_id in sorted(self.outputs, key=lambda k: (len(k), k)):
            found += [dict(img, node=node_id) for img in self.outputs[node_id].get("images", [])]
        return found

    def describe(self) -> str:
        err = self.error
        if err:
            tb = "".join(err.get("traceback") or [])
            return (f"status={self.status.get('status_str')} error in node {err.get('node_id')} "
                    f"({err.get('node_type')}): "
                    f"{err.get('exception_type')}: {err.get('exception_message')}\n{tb}")
        return f"status={self.status.get('status_str')} messages={[m[0] for m in self.messages]}"


class ComfyUIServer:
    """A ComfyUI process on 127.0.0.1 and a small client for its HTTP API."""

    def __init__(self, comfyui: Path, python: str, root: Path, models: Path, port: int | None = None):
        self.comfyui, self.python, self.root, self.models = comfyui, python, root, models
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = ComfyClient(self.url, timeout=60.0, client_id="flux2kit-tests")
        self.input_dir, self.output_dir = root / "input", root / "output"
        self.temp_dir, self.user_dir = root / "temp", root / "user"
        self.log_path = root / "comfyui.log"
        self.extra_paths = root / "extra_model_paths.yaml"
        self.proc: subprocess.Popen | None = None
        self.model_names: dict[str, str] = {}  # role -> name as the loaders list it (see build_models)
        self._log_file = None

    # -- process ---------------------------------------------------------------------------------

    def command(self) -> list[str]:
        return [
            self.python, str(self.comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--extra-model-paths-config", str(self.extra_paths),
            "--base-directory", str(self.root),  # custom_nodes/flux2kit here is this repository
            "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.temp_dir), "--user-directory", str(self.user_dir),
            "--database-url", f"sqlite:///{self.user_dir / 'comfyui.db'}",
        ]

    def link_pack(self) -> Path:
        """``root/custom_nodes/flux2kit``, a symlink to this repository: the only custom_nodes folder ComfyUI
        reads (--base-directory). One already there that leads elsewhere is a ComfyUISetupError."""
        (self.root / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.root / "custom_nodes" / "flux2kit"
        if link.is_symlink() or link.exists():
            if link.resolve() != REPO.resolve():
                raise ComfyUISetupError(f"{link} leads to {link.resolve()}, not to the repository under test "
                                        f"({REPO}): ComfyUI would load that copy. Remove it, or use a fresh folder.")
        else:
            link.symlink_to(REPO, target_is_directory=True)
        return link

    def pack_paths(self) -> list[str]:
        """Where ComfyUI says it imported a pack named flux2kit from (its "Import times" lines in the log)."""
        found = re.findall(r"^\s*\d+\.\d+ seconds(?: \(IMPORT FAILED\))?: (.+?)\s*$", self.log(), re.M)
        return [p for p in found if os.path.basename(p.rstrip("/\\")) == "flux2kit"]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        for d in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.link_pack()
        self.extra_paths.write_text(
            "flux2kit_tests:\n"
            f"    base_path: {json.dumps(str(self.models))}\n"
            "    diffusion_models: diffusion_models/\n"
            "    text_encoders: text_encoders/\n"
            "    vae: vae/\n"
            "    loras: loras/\n",
            encoding="utf-8",
        )
        self._log_file = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # cwd is the tmp root: ComfyUI writes comfyui_detail.log into its working directory.
        self.proc = subprocess.Popen(self.command(), cwd=self.root, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} while starting.\n"
                                   f"Command: {' '.join(self.command())}\n{self.log_tail()}")
            try:
                self.client.request("GET", "/object_info/Flux2KitSampler", timeout=5)
                self.check_pack_path()
                return
            except (Unreachable, Refused):  # not listening yet, or still loading the custom nodes
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer /object_info within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(0.5)

    def check_pack_path(self) -> None:
        """ComfyUI loaded flux2kit from this repository (through the link), not from another copy."""
        elsewhere = [p for p in self.pack_paths() if Path(p).resolve() != REPO.resolve()]
        if elsewhere:
            self.stop()
            raise ComfyUISetupError(f"ComfyUI imported flux2kit from {elsewhere}, not from the repository under test "
                                    f"({REPO}).\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log(self) -> str:
        """The server's console output so far, without colour codes."""
        try:
            return _ANSI.sub("", self.log_path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def wait_for_log(self, pattern: str, *, after: int = 0, timeout: float = 10.0) -> bool:
        """True once ``pattern`` (a regex) appears in the log past character ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()[after:]):
                return True
            time.sleep(0.1)
        return False

    # -- HTTP, through the one ComfyUI client (cli/comfy_client.py) ----------------------------------

    @contextlib.contextmanager
    def _answer(self, method: str, path: str):
        """An HTTP error answer as ComfyUIError (status and parsed body); no answer stays Unreachable."""
        try:
            yield
        except Refused as e:
            try:
                body = json.loads(e.body)
            except ValueError:
                body = e.body.decode("utf-8", "replace")
            raise ComfyUIError(method, path, e.code, body) from None

    def request(self, method: str, path: str, *, json_body=None, files=None, data=None,
                timeout: float = 60.0) -> bytes:
        """The body of a successful answer; an HTTP error raises ComfyUIError."""
        with self._answer(method, path):
            return self.client.request(method, path, json_body=json_body, files=files, data=data, timeout=timeout)

    def get_json(self, path: str):
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload) -> object:
        raw = self.request("POST", path, json_body=payload)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode("utf-8", "replace")

    def object_info(self, node: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node)}" if node else ""))

    def upload_image(self, name: str, data: bytes, *, subfolder: str = "", overwrite: bool = True) -> dict:
        """POST /upload/image (multipart); returns ``{"name", "subfolder", "type"}``."""
        fields = {"type": "input", "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        return json.loads(self.request("POST", "/upload/image", files={"image": (name, data, "image/png")},
                                       data=fields))

    def view(self, image: dict) -> bytes:
        with self._answer("GET", "/view"):
            return self.client.view({k: image.get(k, "") for k in ("filename", "subfolder", "type")})

    def queue(self, prompt: dict) -> str:
        """POST /prompt; the prompt id. A rejected prompt raises ComfyUIError (status 400, body with node_errors)."""
        with self._answer("POST", "/prompt"):
            return self.client.queue_prompt(prompt, prompt_id=str(uuid.uuid4()))

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> Run:
        deadline = time.monotonic() + timeout
        while True:
            with self._answer("GET", f"/history/{prompt_id}"):
                entry = self.client.history(prompt_id)
            if entry and entry.get("status"):
                return Run(prompt_id, entry)
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited (code {self.proc.returncode}) during prompt {prompt_id}.\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(0.1)

    def run(self, prompt: dict, timeout: float = RUN_TIMEOUT) -> Run:
        return self.wait(self.queue(prompt), timeout)

    def free(self, *, unload_models: bool = True, free_memory: bool = True, timeout: float = 30.0) -> None:
        """POST /free and, with free_memory, wait until the prompt worker has reset its caches.

        The worker logs its cache mode when it resets. ComfyUI only looks at the /free flags when its
        queue wakes up, and the wake-up is lost when the flags arrive while the worker is busy
        finishing the previous prompt (it then sleeps until the next prompt, which would still run on
        the old caches), so the request is repeated until the reset shows in the log.
        """
        mark = len(self.log())
        deadline = time.monotonic() + timeout
        while True:
            self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})
            if not free_memory or self.wait_for_log(r"Using RAM pressure cache|Using LRU cache|Disabling intermediate "
                                                    r"node cache", after=mark, timeout=2.0):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"/free had no effect within {timeout:.0f} s.\n{self.log_tail()}")


# -- setup -----------------------------------------------------------------------------------------

def build_models(models: Path) -> dict[str, str]:
    """The demo set plus the extra files (``COMFY_VAE``, ``NOT_A_MODEL``); names as the loaders list them."""
    import torch
    from safetensors.torch import save_file

    from flux2kit.pipelines.demo_models import DEMO_FILES, build_demo_models
    from flux2kit.pipelines.demo_models.vae import build_tiny_vae, save_vae_ldm, tiny_vae_config

    build_demo_models(str(models))
    comfy_vae = models / COMFY_VAE
    if not comfy_vae.exists():
        config = dict(tiny_vae_config(), block_out_channels=[128, 256, 512, 512],
                      decoder_block_out_channels=[32, 64, 128, 128], layers_per_block=2)
        save_vae_ldm(build_tiny_vae(seed=1, config=config), str(comfy_vae))
    bad = models / NOT_A_MODEL
    if not bad.exists():
        save_file({"foo.weight": torch.zeros(4, 4)}, str(bad))

    def name(rel: str) -> str:
        return rel.split("/", 1)[1] + ("/" if (models / rel).is_dir() else "")

    return {
        "transformer": name(DEMO_FILES["transformer"]),
        "text_encoder": name(DEMO_FILES["text_encoder"]),
        "vae": name(DEMO_FILES["vae"]),
        "lora": name(DEMO_FILES["lora"]),
        "comfy_vae": name(COMFY_VAE),
        "not_a_model": name(NOT_A_MODEL),
        "transformer_gguf": name(DEMO_FILES["transformer_gguf"]),
        "text_encoder_gguf": name(DEMO_FILES["text_encoder_gguf"]),
    }


@contextlib.contextmanager
def comfyui_server(root: Path, comfyui: Path | None = None, python: str | None = None):
    """Build the models in ``root/models``, start ComfyUI with flux2kit, yield the ComfyUIServer, stop it.

    COMFYUI_PATH unset: ComfyUIUnavailable (the tests skip); set but unusable: ComfyUISetupError (they fail)."""
    comfyui, python = check_setup(comfyui, python)
    check_requirements(python)
    root.mkdir(parents=True, exist_ok=True)
    models = root / "models"
    names = build_models(models)
    server = ComfyUIServer(comfyui, python, root, models)
    server.model_names = names
    try:
        server.start()
        yield server
    finally:
        server.stop()
