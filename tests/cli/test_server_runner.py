"""``flux2kit run --server``: the server runner against the fake ComfyUI (flux2kit.testing.fake_comfyui), which
runs flux2kit's real nodes on the demo models and speaks ComfyUI's HTTP and websocket protocol.

tests/cli/test_real_comfyui_run.py runs the same command against a real ComfyUI when COMFYUI_PATH is set.
"""

import os
import re

import numpy as np
import PIL.Image
import pytest

from flux2kit.pipelines.errors import Flux2KitError

API = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows", "api")
FAST = dict(size=(80, 64), steps=2)
SIZE_ERROR = (r"node #5 \(Flux2KitSampler\): Size 4096x2048 is not valid\b.*over the 4 MP maximum.*"
              r"nearest valid size is 2896x1440\S*")  # the node's own message: no exception type, no newline


def workflow(stem):
    from flux2kit.cli.workflow.files import load_workflow

    return load_workflow(os.path.join(API, f"{stem}.json"))


def queued_prompt(server):
    """(prompt, extra data) the server queued last, from its /history."""
    from flux2kit.cli.comfy_client import ComfyClient

    prompt_id = [e for e in server.executions() if e["event"] == "queued"][-1]["prompt_id"]
    entry = ComfyClient(server.url).history(prompt_id)
    return entry["prompt"][2], entry["prompt"][3]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_runner")
    refs = []
    for i, (w, h) in enumerate([(96, 64), (64, 64), (64, 112)], start=1):
        rgb = (np.random.RandomState(i).rand(h, w, 3) * 255).astype(np.uint8)
        path = root / f"ref_{i}.png"
        PIL.Image.fromarray(rgb).save(path)
        refs.append(str(path))
    return {"refs": refs}


def test_server_run_uploads_queues_follows_and_fetches(fake_comfyui, folders, tmp_path):
    from flux2kit.cli.server_runner import ServerRunner, write_new
    from flux2kit.cli.workflow.overrides import apply_overrides

    server = fake_comfyui
    messages = []
    runner = ServerRunner(server.url, str(tmp_path), log=messages.append)
    wf = apply_overrides(workflow("three_reference_edit"), seed=9, images=folders["refs"], **FAST)
    paths = runner.run(wf)
    # the local references were uploaded into the input folder's flux2kit/, and the queued prompt names them
    sent, extra = queued_prompt(server)
    assert [sent[n]["inputs"]["image"] for n in ("5", "6", "7")] == ["flux2kit/ref_1.png", "flux2kit/ref_2.png",
                                                                      "flux2kit/ref_3.png"]
    for i, ref in enumerate(folders["refs"], start=1):
        with open(ref, "rb") as f:
            assert (server.root / "input" / "flux2kit" / f"ref_{i}.png").read_bytes() == f.read()
    assert sent["9"]["inputs"]["seed"] == 9 and extra["client_id"] == runner.client.client_id
    # the server's image, fetched through /view into the same subfolder here
    assert len(paths) == 1 and paths[0].startswith(str(tmp_path / "flux2kit" / "three_reference_edit_"))
    made = server.root / "output" / "flux2kit" / os.path.basename(paths[0])
    with open(paths[0], "rb") as f:
        assert f.read() == made.read_bytes()
    with PIL.Image.open(paths[0]) as im:
        assert im.size == (80, 64)
    # followed over the websocket: each node by its class type in the workflow, the steps, the nodes' status text
    assert "#5 LoadImage..." in messages and "#9 Flux2KitSampler..." in messages and "    step 2/2" in messages
    assert any(re.fullmatch(r"    \d+ of \d+ tokens", m) for m in messages), messages  # Text Encode's status
    assert any(m.startswith("    3 references: ") for m in messages), messages  # Reference Encode's status
    # a new seed: the server reuses what did not change (references re-uploaded under the same names)
    messages.clear()
    again = runner.run(apply_overrides(wf, seed=10))
    assert [queued_prompt(server)[0][n]["inputs"]["image"] for n in ("5", "6", "7")] == [
        "flux2kit/ref_1.png", "flux2kit/ref_2.png", "flux2kit/ref_3.png"]
    assert runner.cached == ["1", "2", "3", "4", "5", "6", "7", "8"]
    assert "Cached on the server (unchanged since an earlier run): #1, #2, #3, #4, #5, #6, #7, #8." in messages
    assert "#9 Flux2KitSampler..." in messages and "#5 LoadImage..." not in messages
    assert len(again) == 1 and again != paths and os.path.isfile(paths[0])
    # images fetched here never overwrite a file already there
    with open(paths[0], "rb") as f:
        first = f.read()
    stem = os.path.splitext(paths[0])[0]
    assert write_new(os.path.dirname(paths[0]), os.path.basename(paths[0]), b"other") == stem + "-1.png"
    with open(paths[0], "rb") as f:
        assert f.read() == first


def test_example_images_the_server_lacks_are_uploaded(fake_comfyui, tmp_path):
    """A shipped workflow names flux2kit's example images by bare name: a ComfyUI with flux2kit has them in its input
    folder (installed when the pack loads) and uses its own; one without them (an older flux2kit, an emptied input
    folder; the fake ComfyUI never installs them) gets the shipped file uploaded."""
    from flux2kit.cli.server_runner import EXAMPLE_INPUTS, ServerRunner
    from flux2kit.cli.workflow.overrides import apply_overrides
    from flux2kit.nodes import example_inputs

    assert EXAMPLE_INPUTS == example_inputs.FOLDER  # found by path without ComfyUI's modules: the same folder
    server, messages = fake_comfyui, []
    runner = ServerRunner(server.url, str(tmp_path), log=messages.append)
    assert not (server.root / "input" / "flux2kit_cottage_inpaint.png").exists()
    runner.run(apply_overrides(workflow("inpaint"), seed=1, steps=2))
    sent, _ = queued_prompt(server)
    assert sent["5"]["inputs"]["image"] == "flux2kit/flux2kit_cottage_inpaint.png"
    shipped = (EXAMPLE_INPUTS / "flux2kit_cottage_inpaint.png").read_bytes()
    assert (server.root / "input" / "flux2kit" / "flux2kit_cottage_inpaint.png").read_bytes() == shipped
    assert any(m.startswith("Uploaded ") and m.endswith("as 'flux2kit/flux2kit_cottage_inpaint.png'.") for m in messages)
    # the server's own file under an example's name is the one used: no upload
    PIL.Image.new("RGB", (96, 64), (200, 30, 30)).save(server.root / "input" / "flux2kit_cottage.png")
    messages.clear()
    (path,) = runner.run(apply_overrides(workflow("image_to_image"), seed=1, steps=2))
    assert queued_prompt(server)[0]["5"]["inputs"]["image"] == "flux2kit_cottage.png"
    assert not any(m.startswith("Uploaded ") for m in messages)
    with PIL.Image.open(path) as im:
        assert im.size == (96, 64)  # the start LATENT's size: the server's picture, not the shipped 384 x 256


def test_server_errors_name_the_node(fake_comfyui, tmp_path):
    from flux2kit.cli.server_runner import ServerRunner
    from flux2kit.cli.workflow.graph import NodeError
    from flux2kit.cli.workflow.overrides import apply_overrides

    runner = ServerRunner(fake_comfyui.url, str(tmp_path), log=lambda m: None)
    with pytest.raises(NodeError) as e:  # the node fails while it runs: the execution_error names it
        runner.run(apply_overrides(workflow("text_to_image"), size=(4096, 2048), steps=2))
    assert re.fullmatch(SIZE_ERROR, str(e.value), re.S), str(e.value)
    assert (e.value.node_id, e.value.class_type) == ("5", "Flux2KitSampler") and isinstance(e.value, Flux2KitError)
    wf = workflow("text_to_image")  # refused when queued: ComfyUI's node_errors, one line per node and problem
    wf["5"]["inputs"]["num_inference_steps"] = 80
    with pytest.raises(Flux2KitError, match=r"^The server refused the workflow: Prompt outputs failed validation\n"
                                            r"  node #5 \(Flux2KitSampler\): input 'num_inference_steps' is 80, above "
                                            r"the maximum 50 \[num_inference_steps\]$"):
        runner.run(wf)
    wf = workflow("text_to_image")
    wf["6"]["inputs"]["latent"] = ["4", 0]
    with pytest.raises(Flux2KitError, match=r"^The server refused the workflow: Prompt outputs failed validation\n"
                                            r"  node #6 \(Flux2KitDecode\): Return type mismatch between linked nodes "
                                            r"\[latent, received_type\(FLUX2KIT_CONDITIONING\) mismatch "
                                            r"input_type\(LATENT\)\]$"):
        runner.run(wf)
    wf = workflow("text_to_image")
    wf["6"]["class_type"] = "NoSuchNode"
    with pytest.raises(Flux2KitError, match=r"^The server refused the workflow: Cannot execute because node "
                                            r"NoSuchNode does not exist. \(Node ID '#6'\)$"):
        runner.run(wf)
    with pytest.raises(Flux2KitError, match="Cannot reach the ComfyUI server at http://127.0.0.1:9"):
        ServerRunner("127.0.0.1:9", str(tmp_path), log=lambda m: None).run(workflow("text_to_image"))


def test_without_a_websocket_the_run_is_followed_through_history(fake_comfyui, tmp_path, monkeypatch):
    from flux2kit.cli import comfy_client
    from flux2kit.cli.server_runner import ServerRunner
    from flux2kit.cli.workflow.graph import NodeError
    from flux2kit.cli.workflow.overrides import apply_overrides

    def no_websocket(self, timeout=1.0):
        raise comfy_client.Unreachable("no websocket here")

    monkeypatch.setattr(comfy_client.ComfyClient, "events", no_websocket)
    messages = []
    runner = ServerRunner(fake_comfyui.url, str(tmp_path), log=messages.append)
    with pytest.raises(NodeError) as e:  # the error from the history entry's messages
        runner.run(apply_overrides(workflow("text_to_image"), size=(4096, 2048), steps=2))
    assert re.fullmatch(SIZE_ERROR, str(e.value), re.S), str(e.value)
    assert any("following the run through /history instead" in m for m in messages)
    paths = runner.run(apply_overrides(workflow("text_to_image"), seed=3, **FAST))
    with PIL.Image.open(paths[0]) as im:
        assert im.size == (80, 64)
