"""``flux2kit run``: the shipped API workflows in-process (cli/local_runner.py) on the tiny demo models, and their
errors. On a ComfyUI server (cli/server_runner.py): test_server_runner.py."""

import contextlib
import io
import json
import os

import numpy as np
import PIL.Image
import pytest

from flux2kit.pipelines.errors import Flux2KitError

API = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows", "api")
FAST = dict(size=(80, 64), steps=2)
PROMPT = "a lighthouse on a cliff at dusk, the sign reads FLUX.2"


def workflow(stem):
    from flux2kit.cli.workflow.files import load_workflow

    return load_workflow(os.path.join(API, f"{stem}.json"))


def pixels(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def png_prompt(path):
    with PIL.Image.open(path) as im:
        return json.loads(im.text["prompt"])


@pytest.fixture(scope="module")
def folders(comfy, tmp_path_factory):
    root = tmp_path_factory.mktemp("headless")
    for sub in ("out", "input"):
        (root / sub).mkdir()
    refs = []
    for i, (w, h) in enumerate([(96, 64), (64, 64), (64, 112)], start=1):
        rgb = (np.random.RandomState(i).rand(h, w, 3) * 255).astype(np.uint8)
        path = root / ("input" if i == 1 else "") / f"ref_{i}.png"
        PIL.Image.fromarray(rgb).save(path)
        refs.append(str(path))
    return {"models": str(comfy / "models"), "out": str(root / "out"), "input": str(root / "input"), "refs": refs}


@pytest.fixture(scope="module")
def runner(folders):
    """One runner for the module: like ComfyUI, it reuses unchanged nodes' outputs (the loaded models)."""
    from flux2kit.cli.local_runner import LocalRunner

    messages = []
    r = LocalRunner(folders["models"], folders["out"], input_dir=folders["input"], demo=True, log=messages.append)
    r.messages = messages
    return r


@pytest.fixture(scope="module")
def text_to_image(runner):
    """Seed 5, then 6, then 5 again, on the Sampler workflow: [(path, cached node ids)]."""
    from flux2kit.cli.workflow.overrides import apply_overrides

    runs = []
    for seed in (5, 6, 5):
        paths = runner.run(apply_overrides(workflow("text_to_image"), prompt=PROMPT, seed=seed, **FAST))
        runs.append((paths, list(runner.cached)))
    return runs


def test_text_to_image_saves_a_png_with_the_overrides(text_to_image, runner, folders):
    (paths, cached), _, _ = text_to_image
    assert len(paths) == 1 and os.path.isfile(paths[0]) and paths[0].endswith(".png")
    assert paths[0].startswith(os.path.join(folders["out"], "flux2kit", "text_to_image_"))
    assert pixels(paths[0]).shape == (64, 80, 3) and pixels(paths[0]).std() > 1
    meta = png_prompt(paths[0])
    assert meta["4"]["inputs"]["prompt"] == PROMPT and meta["5"]["inputs"]["seed"] == 5
    assert meta["1"]["inputs"]["model_name"] == "flux2_dev_tiny_fp8mixed.safetensors"  # what actually ran
    assert any("'flux2_dev_fp8mixed.safetensors'" in m and "node #1" in m and "tiny" in m for m in runner.messages)
    assert any(m.startswith("[5/7] #5 FLUX.2 Sampler") for m in runner.messages)
    assert any("step 2/2" in m for m in runner.messages)


def test_seed_changes_the_image_and_the_same_seed_repeats_it(text_to_image):
    (a, _), (b, cached_b), (c, cached_c) = text_to_image
    assert len({a[0], b[0], c[0]}) == 3  # never overwritten
    assert not np.array_equal(pixels(a[0]), pixels(b[0]))
    assert np.array_equal(pixels(a[0]), pixels(c[0]))  # sampled again: the seed-6 run replaced seed 5's outputs
    assert cached_b == ["1", "2", "3", "4"] and cached_c == ["1", "2", "3", "4"]  # models and prompt reused


def test_generate_workflow_makes_the_sampler_workflows_image(text_to_image, runner):
    from flux2kit.cli.workflow.overrides import apply_overrides

    (a, _), _, _ = text_to_image
    paths = runner.run(apply_overrides(workflow("generate_text_to_image"), prompt=PROMPT, seed=5, **FAST))
    assert np.array_equal(pixels(paths[0]), pixels(a[0]))


def test_three_reference_edit_from_the_input_folder_and_paths(runner, folders):
    from flux2kit.cli.workflow.overrides import apply_overrides

    wf = workflow("three_reference_edit")
    wf["5"]["inputs"]["image"] = "ref_1.png"  # a name in the input folder, as ComfyUI's LoadImage takes it
    wf = apply_overrides(wf, seed=3, images=[f"7={folders['refs'][2]}", f"image 2: the jacket={folders['refs'][1]}"],
                         **FAST)
    paths = runner.run(wf)
    assert pixels(paths[0]).shape == (64, 80, 3)
    assert any("3 references" in m for m in runner.messages)
    # the one-node twin makes the same image from the same references
    gen = workflow("generate_three_reference_edit")
    gen = apply_overrides(gen, seed=3, images=folders["refs"], **FAST)  # bare paths fill the LoadImage nodes in order
    assert [gen[n]["inputs"]["image"] for n in ("4", "5", "6")] == folders["refs"]
    assert np.array_equal(pixels(runner.run(gen)[0]), pixels(paths[0]))


def test_only_the_nodes_the_outputs_need_run_in_dependency_order(runner):
    wf = workflow("three_reference_edit")
    wf["99"] = {"class_type": "NotInstalledAnywhere", "inputs": {"x": ["4", 0]}}  # feeds no output: ignored
    wf["12"] = {"class_type": "Flux2KitDecode", "inputs": {"vae": ["3", 0], "latent": ["9", 0]}}  # no output either
    assert runner.plan(wf) == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
    wf["7"]["inputs"]["image"] = ["11", 0]  # the saved image back into image 3: a cycle
    with pytest.raises(Flux2KitError, match=r"cycle through nodes #7, #8, #9, #10, #11"):
        runner.plan(wf)


@pytest.mark.parametrize("change, message", [
    (lambda wf: wf["6"].update(class_type="NoSuchNode"),
     r"node #6 \(NoSuchNode\): unknown node type"),
    (lambda wf: wf["4"]["inputs"].pop("prompt"),
     r"node #4 \(Flux2KitTextEncode\): required input 'prompt' is missing"),
    (lambda wf: wf["5"]["inputs"].update(num_inference_steps=80),
     r"node #5 \(Flux2KitSampler\): input 'num_inference_steps' is 80, above the maximum 50"),
    (lambda wf: wf["5"]["inputs"].update(aspect_ratio="5:4"),
     r"node #5 \(Flux2KitSampler\): input 'aspect_ratio' is '5:4'; choose one of 1:1, 16:9"),
    (lambda wf: wf["6"]["inputs"].update(latent=["4", 0]),
     r"node #6 \(Flux2KitDecode\): input 'latent' takes LATENT but is linked to a FLUX2KIT_CONDITIONING"),
    (lambda wf: wf["6"]["inputs"].update(latent=["42", 0]),
     r"node #6 \(Flux2KitDecode\): input 'latent' is linked to node #42, which is not in the workflow"),
    (lambda wf: wf.pop("7"),
     r"no output node"),
])
def test_bad_workflows_are_refused_before_anything_runs(runner, change, message):
    wf = workflow("text_to_image")
    change(wf)
    runner.messages.clear()
    with pytest.raises(Flux2KitError, match=message):
        runner.run(wf)
    assert not any(m.startswith("[") for m in runner.messages)  # nothing ran


def test_a_size_over_4_mp_is_the_nodes_error(runner):
    from flux2kit.cli.workflow.graph import NodeError
    from flux2kit.cli.workflow.overrides import apply_overrides

    wf = apply_overrides(workflow("text_to_image"), size=(4096, 2048))
    with pytest.raises(NodeError, match=r"node #5 \(Flux2KitSampler\): Size 4096x2048 is not valid.*over the 4 MP "
                                        r"maximum.*nearest valid size is 2896x1440") as e:
        runner.run(wf)
    assert e.value.node_id == "5" and isinstance(e.value, Flux2KitError)


def test_a_missing_model_names_the_loader(comfy, tmp_path):
    """Not on the demo models: no mapping, the loader's own message with the node."""
    from flux2kit.cli.local_runner import LocalRunner

    (tmp_path / "models" / "diffusion_models").mkdir(parents=True)
    r = LocalRunner(str(tmp_path / "models"), str(tmp_path / "out"), log=lambda m: None)
    with pytest.raises(Flux2KitError, match=r"node #1 \(Flux2KitTransformerLoader\): Model not found: "
                                            r"'flux2_dev_fp8mixed.safetensors'. Put it in one of: .*diffusion_models"):
        r.run(workflow("text_to_image"))


def test_a_missing_input_image_says_where_to_put_it(runner, folders):
    from flux2kit.cli.workflow.overrides import apply_overrides

    wf = apply_overrides(workflow("three_reference_edit"), settings=["5.image=my_photo.png"])
    with pytest.raises(Flux2KitError, match=r"node #5 \(LoadImage\): image 'my_photo.png' is not in the input "
                                            r"folder .*Put it there, or pass --image NODE=PATH\.$"):
        runner.run(wf)


def test_an_example_image_missing_from_the_input_folder_is_the_shipped_one(comfy, tmp_path):
    """The shipped workflows' example images (ComfyUI installs them into its input folder) are read from
    workflows/example_inputs when the input folder lacks them; a file of the user's under that name wins."""
    from flux2kit.cli.local_runner import LocalRunner
    from flux2kit.nodes import example_inputs

    (tmp_path / "input").mkdir()
    mine = np.full((16, 16, 3), (10, 200, 30), dtype=np.uint8)
    PIL.Image.fromarray(mine).save(tmp_path / "input" / "flux2kit_jacket.png")
    r = LocalRunner(str(comfy / "models"), str(tmp_path / "out"), input_dir=str(tmp_path / "input"), demo=True,
                    log=lambda m: None)
    saved = {}
    for name in ("flux2kit_person.png", "flux2kit_jacket.png"):
        (path,) = r.run({"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                         "2": {"class_type": "Flux2KitSaveImage", "inputs": {
                             "images": ["1", 0], "filename_prefix": "load", "output_format": "png", "output_quality": 90}}})
        with PIL.Image.open(path) as im:
            saved[name] = np.asarray(im.convert("RGB"))
    assert np.array_equal(saved["flux2kit_person.png"], np.asarray(example_inputs.draw("flux2kit_person.png")))
    assert np.array_equal(saved["flux2kit_jacket.png"], mine)


def test_overrides_are_checked():
    from flux2kit.cli.workflow.overrides import apply_overrides
    from flux2kit.cli.workflow.files import load_workflow

    wf = workflow("text_to_image")
    out = apply_overrides(wf, settings=["5.guidance=2.5", "FLUX.2 Save Image (flux2kit).output_format=webp",
                                        "Flux2KitTransformerLoader.offload_blocks=true"])
    assert out["5"]["inputs"]["guidance"] == 2.5 and out["7"]["inputs"]["output_format"] == "webp"
    assert out["1"]["inputs"]["offload_blocks"] is True and wf["5"]["inputs"]["guidance"] == 4.0  # a copy
    with pytest.raises(Flux2KitError, match="expected NODE.INPUT=VALUE"):
        apply_overrides(wf, settings=["guidance=2"])
    with pytest.raises(Flux2KitError, match=r"No node 'Sampler' in the workflow; nodes: #1 Flux2KitTransformerLoader"):
        apply_overrides(wf, settings=["Sampler.seed=1"])
    with pytest.raises(Flux2KitError, match="Expected a whole number, got 'many'"):
        apply_overrides(wf, settings=["5.seed=many"])
    with pytest.raises(Flux2KitError, match="connected to node #4"):
        apply_overrides(wf, settings=["5.conditioning=1"])
    with pytest.raises(Flux2KitError, match="no node in this workflow has a 'seed' input"):
        apply_overrides({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}, seed=1)
    refs = apply_overrides(workflow("generate_three_reference_edit"), images=[__file__, f"4={API}/text_to_image.json"])
    assert refs["4"]["inputs"]["image"].endswith("text_to_image.json") and refs["5"]["inputs"]["image"] == __file__
    with pytest.raises(Flux2KitError, match=r"1 image\(s\) without a node for 0 LoadImage node\(s\) left"):
        apply_overrides(wf, images=[__file__])
    with pytest.raises(Flux2KitError, match="is a UI workflow"):
        load_workflow(os.path.join(os.path.dirname(API), "text_to_image.json"))


def run_cli(*argv):
    from flux2kit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_run_on_the_demo_models(folders, tmp_path):
    code, stdout, stderr = run_cli("run", os.path.join(API, "generate_text_to_image.json"), "--models", folders["models"],
                                   "--out", tmp_path, "--prompt", PROMPT, "--seed", 5, "--size", "80x64", "--steps", 2)
    assert code == 0, stderr
    path = stdout.strip().splitlines()[-1]
    assert os.path.isfile(path) and path.startswith(str(tmp_path)) and pixels(path).shape == (64, 80, 3)
    assert "tiny random 'flux2_dev_tiny_fp8mixed.safetensors' instead" in stderr
    code, stdout, stderr = run_cli("run", os.path.join(API, "text_to_image.json"), "--models", folders["models"],
                                   "--out", tmp_path, "--set", "Flux2KitSampler.num_inference_steps=80")
    assert code == 2 and not stdout
    assert "flux2kit: error: node #5 (Flux2KitSampler): input 'num_inference_steps' is 80, above the maximum 50" in stderr
