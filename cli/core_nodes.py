"""ComfyUI core nodes the shipped editing workflows use, for in-process runs without ComfyUI (as ``LoadImage`` in
local_runner.py): Grow Mask, Feather Mask and Image Pad for Outpainting.

Same node ids, inputs, defaults and results as core's (ComfyUI 0.29: ``GrowMask`` and ``FeatherMask`` in
comfy_extras/nodes_mask.py, ``ImagePadForOutpaint`` in nodes.py); on a ComfyUI server its own nodes run. They are
written here because ComfyUI is not a package the command line can depend on;
tests/cli/test_real_comfyui_core_nodes.py checks them against the real ones.
"""

from __future__ import annotations

MAX_RESOLUTION = 16384  # core's nodes.MAX_RESOLUTION


def grow_mask(mask, expand: int, tapered_corners: bool):
    """Core's GrowMask: |expand| grey dilations (erosions when negative) with a 3x3 footprint, a cross when tapered.

    scipy's grey_dilation, which core uses, reflects at the border; for a max (or min) over a symmetric
    footprint that equals padding with -inf (+inf), which max pooling does.
    """
    import torch
    import torch.nn.functional as F

    m = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    sign = 1.0 if expand >= 0 else -1.0
    m = m * sign
    for _ in range(abs(expand)):
        if tapered_corners:  # the cross: the larger of the vertical and the horizontal neighbours
            m = torch.maximum(F.max_pool2d(m, (3, 1), stride=1, padding=(1, 0)),
                              F.max_pool2d(m, (1, 3), stride=1, padding=(0, 1)))
        else:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
    return (m * sign).squeeze(1)


def feather_mask(mask, left: int, top: int, right: int, bottom: int):
    """Core's FeatherMask: the mask fades toward the picture's sides (not around the masked area): the k-th
    column (row) from a side, k = 1..n, is multiplied by k / n, n clamped to the width (height); left, right, top,
    bottom in that order, as core multiplies, so corners round as core's do."""
    import torch

    out = mask.reshape(-1, mask.shape[-2], mask.shape[-1]).clone()
    h, w = out.shape[-2:]

    def ramp(size, n, from_end):  # core's (k + 1.0) / n in double, stored in the mask's dtype when multiplied
        r = torch.ones(size, dtype=torch.float64)
        n = min(n, size)
        if n:
            k = (torch.arange(n, dtype=torch.float64) + 1) / n
            if from_end:
                r[size - n:] = k.flip(0)
            else:
                r[:n] = k
        return r.to(out.dtype)

    out *= ramp(w, left, False)
    out *= ramp(w, right, True)
    out *= ramp(h, top, False)[:, None]
    out *= ramp(h, bottom, True)[:, None]
    return out


def pad_for_outpaint(image, left: int, top: int, right: int, bottom: int, feathering: int):
    """Core's ImagePadForOutpaint: a 0.5-grey canvas, the mask 1 on the new border and ((f - d) / f)^2 within
    ``feathering`` pixels of a padded side inside the image (only when 2 f fits in both sides)."""
    import torch

    b, h, w, c = image.shape
    canvas = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=torch.float32)
    canvas[:, top:top + h, left:left + w, :] = image
    mask = torch.ones((h + top + bottom, w + left + right), dtype=torch.float32)
    inner = torch.zeros((h, w), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        # float64, then stored as float32: core squares Python floats into a float32 tensor
        i = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
        j = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
        far_h, far_w = torch.full_like(i, float(h)), torch.full_like(j, float(w))
        d = torch.minimum(torch.minimum(i if top else far_h, (h - i) if bottom else far_h),
                          torch.minimum(j if left else far_w, (w - j) if right else far_w))
        v = (feathering - d) / feathering
        inner = torch.where(d < feathering, (v * v).float(), inner)
    mask[top:top + h, left:left + w] = inner
    return canvas, mask.unsqueeze(0)


def core_nodes() -> list:
    """V3 declarations of the core nodes above (ids and inputs as core's)."""
    from comfy_api.latest import io

    class GrowMask(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="GrowMask", display_name="Grow Mask", category="image/mask",
                             inputs=[io.Mask.Input("mask", tooltip="The mask to grow or shrink."),
                                     io.Int.Input("expand", default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION,
                                                  step=1, tooltip="Pixels to grow (negative: shrink)."),
                                     io.Boolean.Input("tapered_corners", default=True,
                                                      tooltip="Grow by a cross instead of a square.")],
                             outputs=[io.Mask.Output(display_name="MASK")])

        @classmethod
        def execute(cls, mask, expand, tapered_corners) -> io.NodeOutput:
            return io.NodeOutput(grow_mask(mask, expand, tapered_corners))

    class FeatherMask(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            side = dict(default=0, min=0, max=MAX_RESOLUTION, step=1)
            return io.Schema(node_id="FeatherMask", display_name="Feather Mask", category="image/mask",
                             inputs=[io.Mask.Input("mask", tooltip="The mask to fade toward the picture's sides."),
                                     *(io.Int.Input(name, **side, tooltip=f"Pixels of fade at the {name} side.")
                                       for name in ("left", "top", "right", "bottom"))],
                             outputs=[io.Mask.Output(display_name="MASK")])

        @classmethod
        def execute(cls, mask, left, top, right, bottom) -> io.NodeOutput:
            return io.NodeOutput(feather_mask(mask, left, top, right, bottom))

    class ImagePadForOutpaint(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            side = dict(default=0, min=0, max=MAX_RESOLUTION, step=8)
            return io.Schema(node_id="ImagePadForOutpaint", display_name="Pad Image for Outpainting",
                             category="image/transform",
                             inputs=[io.Image.Input("image", tooltip="The image to extend."),
                                     *(io.Int.Input(name, **side, tooltip=f"Pixels to add on the {name}.")
                                       for name in ("left", "top", "right", "bottom")),
                                     io.Int.Input("feathering", default=40, min=0, max=MAX_RESOLUTION, step=1,
                                                  tooltip="Soft mask edge inside the image, in pixels.")],
                             outputs=[io.Image.Output(display_name="IMAGE"), io.Mask.Output(display_name="MASK")])

        @classmethod
        def execute(cls, image, left, top, right, bottom, feathering) -> io.NodeOutput:
            return io.NodeOutput(*pad_for_outpaint(image, left, top, right, bottom, feathering))

    return [GrowMask, FeatherMask, ImagePadForOutpaint]
