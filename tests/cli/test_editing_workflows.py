"""The shipped editing workflows, headless and in-process on the tiny demo models, with the shipped example images
(workflows/example_inputs, read from there when the input folder lacks them); the core nodes the local runner
provides for them. ``flux2kit run --server`` uploading the example images: test_server_runner.py."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API = os.path.join(REPO, "workflows", "api")
EXAMPLES = os.path.join(REPO, "workflows", "example_inputs")


def workflow(stem):
    from flux2kit.cli.workflow.files import load_workflow

    return load_workflow(os.path.join(API, f"{stem}.json"))


def pixels(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def runner(comfy, tmp_path_factory):
    from flux2kit.cli.local_runner import LocalRunner

    root = tmp_path_factory.mktemp("editing_workflows")
    (root / "input").mkdir()  # empty: the example images come from workflows/example_inputs
    return LocalRunner(str(comfy / "models"), str(root / "out"), input_dir=str(root / "input"), demo=True,
                       log=lambda message: None)


def run(runner, stem, **overrides):
    from flux2kit.cli.workflow.overrides import apply_overrides

    paths = runner.run(apply_overrides(workflow(stem), seed=3, steps=2, **overrides))
    assert len(paths) == 1
    return pixels(paths[0])


def test_image_to_image_keeps_the_start_images_size(runner):
    out = run(runner, "image_to_image", size=(512, 512))  # the LATENT's size wins over the size inputs
    source = pixels(os.path.join(EXAMPLES, "flux2kit_cottage.png"))
    assert out.shape == source.shape == (256, 384, 3)
    assert np.abs(out.astype(int) - source).mean() > 3


def test_inpaint_repaints_only_the_grown_mask(runner):
    out = run(runner, "inpaint")
    with PIL.Image.open(os.path.join(EXAMPLES, "flux2kit_cottage_inpaint.png")) as im:
        rgba = np.asarray(im.convert("RGBA"))
    hole = rgba[..., 3] == 0
    grown = np.zeros_like(hole)  # Grow Mask (8 pixels, tapered corners): within 8 steps of a cross
    ys, xs = np.nonzero(hole)
    grown[max(ys.min() - 8, 0):ys.max() + 9, max(xs.min() - 8, 0):xs.max() + 9] = True
    assert out.shape == (256, 384, 3)
    assert np.array_equal(out[~grown], rgba[..., :3][~grown])  # pasted back exactly
    assert np.abs(out[hole].astype(int) - rgba[..., :3][hole]).mean() > 3


def test_outpaint_extends_the_canvas_and_keeps_the_middle(runner):
    out = run(runner, "outpaint")
    source = pixels(os.path.join(EXAMPLES, "flux2kit_cottage.png"))
    assert out.shape == (256, 128 + 384 + 128, 3)
    # inside the picture the 24-pixel fade ((24 - d) / 24)^2 reaches 0.5 up to d = 7 from the new sides (columns
    # 0-7 on the left, where d = j, and 377-383 on the right, where d = 384 - j): those are repainted
    assert np.array_equal(out[:, 128 + 8:128 + 377], source[:, 8:377])
    assert np.abs(out[:, :100].astype(int) - 128).mean() > 3  # the grey border was painted


def test_multi_reference_with_cached_references_runs(runner):
    out = run(runner, "multi_reference_cached", size=(128, 128))
    assert out.shape == (128, 128, 3) and out.std() > 5


# -- the core nodes of the local runner ------------------------------------------------------------------

def naive_grow(mask, expand, tapered):
    """Grey dilation (erosion) by hand: each pixel takes the max (min) over the 3x3 footprint inside the image."""
    m = mask.copy()
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if not (tapered and dy and dx)]
    for _ in range(abs(expand)):
        out = m.copy()
        for y in range(m.shape[0]):
            for x in range(m.shape[1]):
                vals = [m[y + dy, x + dx] for dy, dx in offsets
                        if 0 <= y + dy < m.shape[0] and 0 <= x + dx < m.shape[1]]
                out[y, x] = max(vals) if expand > 0 else min(vals)
        m = out
    return m


@pytest.mark.parametrize("expand, tapered", [(3, True), (2, False), (-2, True)])
def test_grow_mask_is_a_grey_dilation(comfy, expand, tapered):
    from flux2kit.cli.core_nodes import core_nodes

    grow = {c.define_schema().node_id: c for c in core_nodes()}["GrowMask"]
    rng = np.random.default_rng(0)
    mask = ((rng.uniform(size=(12, 15)) > 0.8) * rng.uniform(0.5, 1.0, size=(12, 15))).astype(np.float32)
    if expand < 0:
        mask = (1 - mask).astype(np.float32)
    out = grow.execute(mask=torch.from_numpy(mask)[None], expand=expand, tapered_corners=tapered).result[0]
    np.testing.assert_array_equal(out[0].numpy(), naive_grow(mask, expand, tapered))


def naive_feather(mask, left, top, right, bottom):
    """Core's Feather Mask by hand: the n-th pixel from a side (n = 1 at the side) times n / size, size capped at
    the mask's width (height); the four fades in core's order (left, right, top, bottom), each factor in float32."""
    h, w = mask.shape
    left, right, top, bottom = min(left, w), min(right, w), min(top, h), min(bottom, h)
    out = mask.copy()
    for y in range(h):
        for x in range(w):
            v = out[y, x]
            for n, size in ((x + 1, left), (w - x, right), (y + 1, top), (h - y, bottom)):
                if n <= size:
                    v = np.float32(v * np.float32(n / size))
            out[y, x] = v
    return out


@pytest.mark.parametrize("sides", [(3, 2, 4, 1), (0, 5, 0, 0), (20, 3, 9, 30)])  # the last exceeds 9 x 7: capped
def test_feather_mask_fades_toward_the_sides(comfy, sides):
    from flux2kit.cli.core_nodes import core_nodes

    feather = {c.define_schema().node_id: c for c in core_nodes()}["FeatherMask"]
    mask = np.random.default_rng(1).uniform(0.2, 1.0, size=(9, 7)).astype(np.float32)
    out = feather.execute(torch.from_numpy(mask)[None], *sides).result[0]
    assert out.shape == (1, 9, 7) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy(), naive_feather(mask, *sides))
    if sides == (20, 3, 9, 30):  # capped: the same as feathering by the whole width (height)
        capped = feather.execute(torch.from_numpy(mask)[None], 7, 3, 7, 9).result[0]
        assert torch.equal(out, capped)
        assert out[0, 0, 0] == np.float32(np.float32(np.float32(mask[0, 0] * np.float32(1 / 7)) * np.float32(7 / 7))
                                          * np.float32(1 / 3))  # left 1/7, right 7/7, top 1/3, bottom 9/9


def test_pad_for_outpaint_is_cores(comfy):
    """Against core's own loop (nodes.py ImagePadForOutpaint.expand_image, transcribed)."""
    from flux2kit.cli.core_nodes import core_nodes

    pad = {c.define_schema().node_id: c for c in core_nodes()}["ImagePadForOutpaint"]
    image = torch.rand(1, 40, 50, 3)
    left, top, right, bottom, f = 16, 0, 8, 24, 10
    canvas, mask = pad.execute(image=image, left=left, top=top, right=right, bottom=bottom, feathering=f).result
    d2, d3 = 40, 50
    t = torch.zeros((d2, d3), dtype=torch.float32)
    for i in range(d2):
        for j in range(d3):
            d = min(i if top != 0 else d2, d2 - i if bottom != 0 else d2, j if left != 0 else d3,
                    d3 - j if right != 0 else d3)
            if d < f:
                v = (f - d) / f
                t[i, j] = v * v
    expected = torch.ones((d2 + top + bottom, d3 + left + right))
    expected[top:top + d2, left:left + d3] = t
    assert torch.equal(mask[0], expected)
    assert canvas.shape == (1, 64, 74, 3) and torch.equal(canvas[:, top:top + d2, left:left + d3], image)
    assert (canvas[:, :, :left] == 0.5).all()
