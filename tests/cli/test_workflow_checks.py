"""One check of workflow values, two callers: they must not drift apart.

``flux2kit run`` in-process checks a workflow before anything runs (``LocalRunner.plan``, on the node classes);
``flux2kit batch`` (and the fake ComfyUI server) check it against /object_info (``check_workflow``). Both
go through ``cli.workflow.schema.check_value``; the same bad value must be refused by both, in the same
words. (They once differed: NaN passed the in-process check; colours and DynamicCombo choices were checked
only by batch; DynamicCombo child values only in-process.) And ``load_workflow`` is ``read_workflow`` plus
refusing UI files: both normalise API files and POST /prompt bodies the same way.
"""

import json
import os

import pytest

from flux2kit.pipelines.errors import Flux2KitError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API = os.path.join(REPO, "workflows", "api")
STEMS = sorted(os.path.splitext(f)[0] for f in os.listdir(API) if f.endswith(".json"))
DEMO = {"Flux2KitTransformerLoader": ("model_name", "flux2_dev_tiny_fp8mixed.safetensors"),
        "Flux2KitTextEncoderLoader": ("text_encoder_name", "mistral_3_small_tiny/"),
        "Flux2KitVAELoader": ("vae_name", "flux2-vae-tiny.safetensors"),
        "Flux2KitLoraLoader": ("lora_name", "flux2_dev_tiny_lora.safetensors")}

# (workflow, node, input, bad value or MISSING, the problem both checks must report)
MISSING = object()
BAD = {
    "NaN for a FLOAT": ("text_to_image", "5", "guidance", float("nan"), "must be a number, got nan"),
    "a float for an INT": ("text_to_image", "5", "seed", 1.5, "must be a whole number, got 1.5"),
    "a bool for an INT": ("text_to_image", "5", "seed", True, "must be a whole number, got True"),
    "over an INT's maximum": ("text_to_image", "5", "num_inference_steps", 80, "is 80, above the maximum 50"),
    "a string for a BOOLEAN": ("text_to_image", "1", "offload_blocks", "yes", "must be true or false, got 'yes'"),
    "a number for a STRING": ("text_to_image", "4", "prompt", 3, "must be text, got 3"),
    "an unknown COMBO choice": ("text_to_image", "5", "aspect_ratio", "5:4",
                                "is '5:4'; choose one of 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3, match_input_image"),
    "a bad colour": ("json_prompt_palette", "4", "color_1", "#12",
                     "is not a colour: '#12' is not a HEX colour: it has 2 hex digits. Write 3 (#RGB) or 6 "
                     "(#RRGGBB), e.g. #02EB3C."),
    "a colour that is not text": ("json_prompt_palette", "5", "color_2", 255, "must be a colour as #RRGGBB, got 255"),
    "an unknown DynamicCombo choice": ("api_two_references", "3", "model", "BFL flux-3",
                                       "is 'BFL flux-3'; choose one of BFL flux-2-pro, BFL flux-2-pro-preview, "
                                       "BFL flux-2-max, BFL flux-2-flex, BFL flux-2-klein-4b, BFL flux-2-klein-9b, "
                                       "Oxen flux-2-pro, Oxen flux-2-flex, Oxen flux-2-dev, "
                                       "Oxen black-forest-labs-flux-2-klein-4b"),
    "a DynamicCombo child over its maximum": ("api_two_references", "3", "model.safety_tolerance", 9,
                                              "is 9, above the maximum 5"),
    "a missing DynamicCombo child": ("api_two_references", "3", "model.safety_tolerance", MISSING, None),
}


@pytest.fixture(scope="module")
def runner(comfy, tmp_path_factory):
    """An in-process runner whose input folder holds the images the shipped workflows name (installed as ComfyUI
    installs them when the pack loads)."""
    from flux2kit.cli.local_runner import LocalRunner
    from flux2kit.nodes import example_inputs

    root = tmp_path_factory.mktemp("checks")
    example_inputs.install(str(root / "input"))
    return LocalRunner(str(comfy / "models"), str(root / "out"), input_dir=str(root / "input"), log=lambda m: None)


@pytest.fixture(scope="module")
def object_info(runner):
    """/object_info as a server running this pack answers it."""
    from flux2kit.cli.local_runner import local_object_info

    return local_object_info(runner)


def workflow(stem):
    """A shipped API workflow naming the demo models, so the loaders' choices are in their lists."""
    from flux2kit.cli.workflow.files import load_workflow

    wf = load_workflow(os.path.join(API, f"{stem}.json"))
    for node in wf.values():
        if node["class_type"] in DEMO:
            name, value = DEMO[node["class_type"]]
            node["inputs"][name] = value
    return wf


@pytest.mark.parametrize("stem", STEMS)
def test_the_shipped_workflows_pass_both_checks(stem, runner, object_info):
    from flux2kit.cli.workflow.schema import check_workflow

    wf = workflow(stem)
    assert check_workflow(wf, object_info) == []
    assert sorted(runner.plan(wf), key=int) == sorted(wf, key=int)  # every node checked, and needed


@pytest.mark.parametrize("case", BAD)
def test_a_bad_value_is_refused_by_both_checks_in_the_same_words(case, runner, object_info):
    from flux2kit.cli.workflow.graph import NodeError
    from flux2kit.cli.workflow.schema import check_workflow

    stem, nid, name, value, problem = BAD[case]
    wf = workflow(stem)
    if value is MISSING:
        del wf[nid]["inputs"][name]
        expected = f"node #{nid} ({wf[nid]['class_type']}): required input {name!r} is missing"
    else:
        wf[nid]["inputs"][name] = value
        expected = f"node #{nid} ({wf[nid]['class_type']}): input {name!r} {problem}"
    assert check_workflow(wf, object_info) == [expected]  # flux2kit batch, against /object_info
    with pytest.raises(NodeError) as e:  # flux2kit run, in-process
        runner.plan(wf)
    assert e.value.node_id == nid
    assert str(e.value).removesuffix(".") == expected.removesuffix(".")  # a sentence ends with one full stop
    assert str(e.value).endswith(".") and not str(e.value).endswith("..")


def test_the_value_check_itself():
    """check_value on the specs both callers pass it (INPUT_TYPES and /object_info have the same shape)."""
    from flux2kit.cli.workflow.schema import check_value

    assert check_value(["FLOAT", {"min": 0.0, "max": 10.0}], float("nan")) == "must be a number, got nan"
    assert check_value(["FLOAT", {"min": 0.0, "max": 10.0}], 2) is None  # a whole number is a fine FLOAT
    assert check_value([["a", "b"], {}], "c", check_options=False) is None  # model files and images: the node's
    assert check_value(["COLOR", {}], "#02EB3C") is None and check_value(["COLOR", {}], "#abc") is None


def test_the_api_nodes_model_and_the_colour_pickers_are_checked_by_their_schemas(object_info):
    from flux2kit.cli.workflow.schema import check_value, spec_of

    spec = spec_of(object_info["Flux2KitAPIGenerate"], "model")
    assert check_value(spec, "BFL flux-2-pro") is None
    assert "choose one of BFL flux-2-pro" in check_value(spec, "BFL flux-3")
    color = spec_of(object_info["Flux2KitHexPalette"], "color_1")
    assert color[0] == "COLOR"
    assert check_value(color, "#02EB3C") is None
    assert "#RRGGBB" in check_value(color, "#GGG")


# -- read_workflow and load_workflow ---------------------------------------------------------------------

@pytest.mark.parametrize("stem", STEMS)
def test_read_and_load_agree_on_api_files_and_prompt_bodies(stem, tmp_path):
    from flux2kit.cli.workflow.files import load_workflow, read_workflow

    path = os.path.join(API, f"{stem}.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    data, kind = read_workflow(path)
    assert kind == "api" and load_workflow(path) == data == raw  # the shipped files are already normalised
    body = tmp_path / "body.json"  # what a client POSTs to /prompt
    body.write_text(json.dumps({"prompt": raw, "client_id": "someone", "extra_data": {"x": 1}}), encoding="utf-8")
    assert read_workflow(str(body)) == (data, "api")
    assert load_workflow(str(body)) == data


def test_read_and_load_normalise_alike_and_refuse_alike(tmp_path):
    from flux2kit.cli.workflow.files import load_workflow, read_workflow

    sparse = tmp_path / "sparse.json"  # inputs missing: normalised to an empty dict, ids as strings
    sparse.write_text(json.dumps({"7": {"class_type": "Flux2KitSaveImage"}}), encoding="utf-8")
    expected = {"7": {"class_type": "Flux2KitSaveImage", "inputs": {}}}
    assert read_workflow(str(sparse)) == (expected, "api") and load_workflow(str(sparse)) == expected
    body = tmp_path / "sparse_body.json"
    body.write_text(json.dumps({"prompt": {"7": {"class_type": "Flux2KitSaveImage"}}}), encoding="utf-8")
    assert read_workflow(str(body)) == (expected, "api") and load_workflow(str(body)) == expected
    ui = os.path.join(REPO, "workflows", "text_to_image.json")
    assert read_workflow(ui)[1] == "ui"
    with pytest.raises(Flux2KitError, match="is a UI workflow"):
        load_workflow(ui)
    for bad, message in (({"1": {"inputs": {}}}, "is not an API-format workflow"), ([], "is not an API-format"),
                         ({}, "is not an API-format")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad), encoding="utf-8")
        for read in (read_workflow, load_workflow):
            with pytest.raises(Flux2KitError, match=message):
                read(str(path))
    for read in (read_workflow, load_workflow):
        with pytest.raises(Flux2KitError, match="Workflow not found"):
            read(str(tmp_path / "nowhere.json"))
        (tmp_path / "broken.json").write_text("{", encoding="utf-8")
        with pytest.raises(Flux2KitError, match="is not a JSON workflow"):
            read(str(tmp_path / "broken.json"))
