"""The real-ComfyUI tests' setup rule (flux2kit.testing.real_comfyui, the ``comfyui`` fixture in conftest.py):
COMFYUI_PATH unset, they skip; set but broken, they fail with a message saying what to fix. No ComfyUI is
needed or started: every setup here is broken before a server could start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flux2kit.testing.real_comfyui import (
    REPO, ComfyUIServer, ComfyUISetupError, ComfyUIUnavailable, check_setup,
)


@pytest.fixture
def checkout(tmp_path):
    """A folder that looks like a ComfyUI checkout to the harness (it has a main.py)."""
    (tmp_path / "ComfyUI").mkdir()
    (tmp_path / "ComfyUI" / "main.py").write_text("raise SystemExit('not a real ComfyUI')\n")
    return tmp_path / "ComfyUI"


def test_unset_comfyui_path_means_skip(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(ComfyUIUnavailable):
        check_setup()


def test_checkout_without_main_py(tmp_path):
    with pytest.raises(ComfyUISetupError, match=r"has no main\.py\. Point COMFYUI_PATH at a ComfyUI checkout"):
        check_setup(tmp_path)


def test_missing_python(checkout, monkeypatch):
    monkeypatch.setenv("COMFYUI_PYTHON", str(checkout / "no-venv" / "bin" / "python"))
    with pytest.raises(ComfyUISetupError, match=r"no-venv/bin/python \(COMFYUI_PYTHON\) does not exist\. "
                                                r"Set COMFYUI_PYTHON to the Python of ComfyUI's environment"):
        check_setup(checkout)
    monkeypatch.delenv("COMFYUI_PYTHON")
    with pytest.raises(ComfyUISetupError, match=r"comfyui-venv/bin/python \(the default Python"):
        check_setup(checkout)


def test_python_without_comfyuis_requirements(checkout, tmp_path):
    python = tmp_path / "python"  # a Python that cannot import ComfyUI's requirements
    python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'aiohttp'\" >&2\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(ComfyUISetupError, match=r"cannot import ComfyUI's requirements \(ModuleNotFoundError: No "
                                                r"module named 'aiohttp'\)\. Set COMFYUI_PYTHON"):
        check_setup(checkout, str(python))


def test_the_pack_link_leads_to_this_repository(checkout, tmp_path):
    """Each server's own custom_nodes/flux2kit (its --base-directory) is a link to the repository under test, the
    only custom_nodes folder ComfyUI reads then; a link already there that leads to another copy is refused."""
    server = ComfyUIServer(checkout, sys.executable, tmp_path / "root", tmp_path / "models")
    link = server.link_pack()
    assert link == tmp_path / "root" / "custom_nodes" / "flux2kit" and link.resolve() == REPO.resolve()
    assert server.link_pack() == link  # already right: kept
    other = tmp_path / "another-flux2kit"
    other.mkdir()
    link.unlink()
    link.symlink_to(other, target_is_directory=True)
    with pytest.raises(ComfyUISetupError, match=r"leads to .*another-flux2kit, not to the repository under test"):
        server.link_pack()


def test_the_server_refuses_a_pack_imported_from_elsewhere(checkout, tmp_path):
    server = ComfyUIServer(checkout, sys.executable, tmp_path / "root", tmp_path / "models")
    server.root.mkdir()
    link = server.link_pack()
    server.log_path.write_text(f"Import times for custom nodes:\n   0.4 seconds: {link}\n")
    assert server.pack_paths() == [str(link)]
    server.check_pack_path()
    server.log_path.write_text("Import times for custom nodes:\n   0.4 seconds: /elsewhere/custom_nodes/flux2kit\n")
    with pytest.raises(ComfyUISetupError, match=r"imported flux2kit from \['/elsewhere/custom_nodes/flux2kit'\]"):
        server.check_pack_path()


def test_a_broken_setup_fails_the_real_comfyui_tests_instead_of_skipping(checkout, tmp_path):
    """COMFYUI_PATH set, COMFYUI_PYTHON wrong: a real-ComfyUI test errors with the fix in its message.

    The fixture used to turn every setup problem into a skip (``except ComfyUIUnavailable: pytest.skip``), so
    this run reported "1 skipped" (``git show 27ec950:tests/conftest.py``)."""
    env = dict(os.environ, COMFYUI_PATH=str(checkout), COMFYUI_PYTHON=str(tmp_path / "wrong" / "python"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rE",
         "tests/nodes/test_real_comfyui.py::test_pack_imports_cleanly"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "1 error" in out and "skipped" not in out, out[-3000:]
    assert "COMFYUI_PATH is set, but the real-ComfyUI tests cannot run" in out, out[-3000:]
    assert f"{Path(tmp_path / 'wrong' / 'python')} (COMFYUI_PYTHON) does not exist" in out, out[-3000:]
