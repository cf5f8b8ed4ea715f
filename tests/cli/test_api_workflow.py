"""The shipped API workflow run by ``flux2kit run`` (in-process) against the local BFL stand-in
(flux2kit.testing.hosted_api); the node itself: tests/nodes/test_api_node.py."""

import json
import os

import pytest
from PIL import Image

from flux2kit.pipelines.hosted.jobs import RetryPolicy
from flux2kit.testing.hosted_api import ApiServer

KEY = "sk-cli-test-8d2e4b6a10-SECRET"
FAST = RetryPolicy(first_poll_delay=0.0, poll_interval=0.01, max_poll_interval=0.02, retry_delay=0.01,
                   max_retry_delay=0.02, deadline=5.0, connect_timeout=2.0, read_timeout=5.0, cancel_check=0.01)


@pytest.fixture(scope="module")
def server():
    with ApiServer(key=KEY) as s:
        yield s


def test_headless_runs_the_api_workflow_against_the_local_server(comfy, server, monkeypatch, tmp_path, caplog):
    """`flux2kit run` in-process: FLUX2KIT_BFL_BASE_URL points the workflow at the local server."""
    from flux2kit.cli.local_runner import LocalRunner
    from flux2kit.cli.workflow.files import load_workflow
    from flux2kit.cli.workflow.overrides import apply_overrides
    from flux2kit.nodes import api

    monkeypatch.setattr(api, "POLICY", FAST)
    monkeypatch.setenv("BFL_API_KEY", KEY)
    monkeypatch.setenv("FLUX2KIT_BFL_BASE_URL", server.url)
    server.reset({})
    paths = []
    for i, size in enumerate([(120, 80), (64, 96)]):
        p = tmp_path / f"ref{i}.png"
        Image.new("RGB", size, (50 * i, 100, 150)).save(p)
        paths.append(str(p))
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows", "api")
    wf = apply_overrides(load_workflow(os.path.join(root, "api_two_references.json")), images=paths,
                                  seed=11)
    lines = []
    runner = LocalRunner(str(tmp_path / "models"), str(tmp_path / "out"), input_dir=str(tmp_path), log=lines.append)
    saved = runner.run(wf)
    assert len(saved) == 1 and os.path.isfile(saved[0])
    body = json.loads(server.submissions()[0]["body"])
    assert body["seed"] == 11 and (body["width"], body["height"]) == (1248, 832)  # 3:2 from image 1
    assert "input_image_2" in body
    with open(saved[0], "rb") as f:
        assert KEY.encode() not in f.read()  # not in the PNG's prompt/workflow metadata
    assert not server.key_leaks(KEY)  # the key only in the auth header, never in logs or messages
    assert KEY not in repr(lines) and KEY not in caplog.text


def test_cli_run_of_an_api_workflow_builds_no_demo_models(comfy, server, monkeypatch, tmp_path):
    """No local loaders in the graph: `flux2kit run` keeps the workflow's sizes and builds no demo models."""
    from flux2kit import cli
    from flux2kit.nodes import api

    monkeypatch.setattr(api, "POLICY", FAST)
    monkeypatch.setenv("BFL_API_KEY", KEY)
    monkeypatch.setenv("FLUX2KIT_BFL_BASE_URL", server.url)
    monkeypatch.chdir(tmp_path)
    server.reset({})
    paths = []
    for i, size in enumerate([(120, 80), (64, 96)]):
        p = tmp_path / f"ref{i}.png"
        Image.new("RGB", size, (50 * i, 100, 150)).save(p)
        paths.append(str(p))
    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows", "api",
                            "api_two_references.json")
    code = cli.main(["run", workflow, "--image", paths[0], "--image", paths[1], "--out", str(tmp_path / "out")])
    assert code == 0
    assert not (tmp_path / "demo-models").exists()
    body = json.loads(server.submissions()[0]["body"])
    assert (body["width"], body["height"]) == (1248, 832)  # the workflow's 1 MP, 3:2 from image 1; not demo 256x256
    assert len(os.listdir(tmp_path / "out")) >= 1
