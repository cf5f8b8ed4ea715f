"""Fixtures of the command-line tests: one fake ComfyUI server for the session (flux2kit.testing.fake_comfyui)."""

import pytest


@pytest.fixture(scope="session")
def fake_comfyui(comfy, tmp_path_factory):
    """A process speaking ComfyUI's protocol, running flux2kit's real nodes on the demo models (the ``comfy``
    fixture's models folder). Like ComfyUI it reuses the outputs of nodes the previous prompt ran unchanged."""
    from flux2kit.testing.fake_comfyui import start_servers

    (server,) = start_servers(1, tmp_path_factory.mktemp("fake_comfyui"), comfy / "models")
    yield server
    server.kill()
