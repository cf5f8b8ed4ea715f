"""HEX colour palettes: parsing, the nearest CSS colour name (CIEDE2000), dominant colours, swatches.

FLUX.2 follows exact HEX colours bound to objects with a signal word ("the vase is color #02EB3C");
a colour name in parentheses helps ("#FF6B6B (salmon)"). Names come from the CSS named colours,
the nearest by CIEDE2000 (Sharma, Wu and Dalal 2005) in CIELAB under D65.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import Flux2KitError

MAX_PALETTE_COLORS = 16  # BFL recommends 3-5; more dilutes each colour and lengthens the prompt

_HEX = re.compile(r"[0-9a-fA-F]+")

# CSS Color Module 4 named colours, written with spaces so a name reads as words in a prompt
# ("lime green"); the CSS keyword is the name without spaces. Aliases (aqua/cyan, fuchsia/magenta,
# grey spellings) appear once.
CSS_COLORS: dict[str, str] = {
    "alice blue": "#F0F8FF", "antique white": "#FAEBD7", "aqua": "#00FFFF", "aquamarine": "#7FFFD4",
    "azure": "#F0FFFF", "beige": "#F5F5DC", "bisque": "#FFE4C4", "black": "#000000",
    "blanched almond": "#FFEBCD", "blue": "#0000FF", "blue violet": "#8A2BE2", "brown": "#A52A2A",
    "burly wood": "#DEB887", "cadet blue": "#5F9EA0", "chartreuse": "#7FFF00", "chocolate": "#D2691E",
    "coral": "#FF7F50", "cornflower blue": "#6495ED", "cornsilk": "#FFF8DC", "crimson": "#DC143C",
    "dark blue": "#00008B", "dark cyan": "#008B8B", "dark goldenrod": "#B8860B", "dark gray": "#A9A9A9",
    "dark green": "#006400", "dark khaki": "#BDB76B", "dark magenta": "#8B008B", "dark olive green": "#556B2F",
    "dark orange": "#FF8C00", "dark orchid": "#9932CC", "dark red": "#8B0000", "dark salmon": "#E9967A",
    "dark sea green": "#8FBC8F", "dark slate blue": "#483D8B", "dark slate gray": "#2F4F4F",
    "dark turquoise": "#00CED1", "dark violet": "#9400D3", "deep pink": "#FF1493", "deep sky blue": "#00BFFF",
    "dim gray": "#696969", "dodger blue": "#1E90FF", "firebrick": "#B22222", "floral white": "#FFFAF0",
    "forest green": "#228B22", "fuchsia": "#FF00FF", "gainsboro": "#DCDCDC", "ghost white": "#F8F8FF",
    "gold": "#FFD700", "goldenrod": "#DAA520", "gray": "#808080", "green": "#008000",
    "green yellow": "#ADFF2F", "honeydew": "#F0FFF0", "hot pink": "#FF69B4", "indian red": "#CD5C5C",
    "indigo": "#4B0082", "ivory": "#FFFFF0", "khaki": "#F0E68C", "lavender": "#E6E6FA",
    "lavender blush": "#FFF0F5", "lawn green": "#7CFC00", "lemon chiffon": "#FFFACD", "light blue": "#ADD8E6",
    "light coral": "#F08080", "light cyan": "#E0FFFF", "light goldenrod yellow": "#FAFAD2",
    "light gray": "#D3D3D3", "light green": "#90EE90", "light pink": "#FFB6C1", "light salmon": "#FFA07A",
    "light sea green": "#20B2AA", "light sky blue": "#87CEFA", "light slate gray": "#778899",
    "light steel blue": "#B0C4DE", "light yellow": "#FFFFE0", "lime": "#00FF00", "lime green": "#32CD32",
    "linen": "#FAF0E6", "maroon": "#800000", "medium aquamarine": "#66CDAA", "medium blue": "#0000CD",
    "medium orchid": "#BA55D3", "medium purple": "#9370DB", "medium sea green": "#3CB371",
    "medium slate blue": "#7B68EE", "medium spring green": "#00FA9A", "medium turquoise": "#48D1CC",
    "medium violet red": "#C71585", "midnight blue": "#191970", "mint cream": "#F5FFFA", "misty rose": "#FFE4E1",
    "moccasin": "#FFE4B5", "navajo white": "#FFDEAD", "navy": "#000080", "old lace": "#FDF5E6",
    "olive": "#808000", "olive drab": "#6B8E23", "orange": "#FFA500", "orange red": "#FF4500",
    "orchid": "#DA70D6", "pale goldenrod": "#EEE8AA", "pale green": "#98FB98", "pale turquoise": "#AFEEEE",
    "pale violet red": "#DB7093", "papaya whip": "#FFEFD5", "peach puff": "#FFDAB9", "peru": "#CD853F",
    "pink": "#FFC0CB", "plum": "#DDA0DD", "powder blue": "#B0E0E6", "purple": "#800080",
    "rebecca purple": "#663399", "red": "#FF0000", "rosy brown": "#BC8F8F", "royal blue": "#4169E1",
    "saddle brown": "#8B4513", "salmon": "#FA8072", "sandy brown": "#F4A460", "sea green": "#2E8B57",
    "seashell": "#FFF5EE", "sienna": "#A0522D", "silver": "#C0C0C0", "sky blue": "#87CEEB",
    "slate blue": "#6A5ACD", "slate gray": "#708090", "snow": "#FFFAFA", "spring green": "#00FF7F",
    "steel blue": "#4682B4", "tan": "#D2B48C", "teal": "#008080", "thistle": "#D8BFD8", "tomato": "#FF6347",
    "turquoise": "#40E0D0", "violet": "#EE82EE", "wheat": "#F5DEB3", "white": "#FFFFFF",
    "white smoke": "#F5F5F5", "yellow": "#FFFF00", "yellow green": "#9ACD32",
}


# -- HEX ----------------------------------------------------------------------------------------

def parse_hex(text: str) -> str:
    """A typed or picked colour -> canonical ``#RRGGBB`` (upper case).

    Accepts ``#RGB`` and ``#RRGGBB`` in any case, with or without ``#``, and ``#RRGGBBFF`` (the
    colour picker's opaque form; other alpha values are refused: a prompt has no transparency).
    """
    if not isinstance(text, str):
        raise Flux2KitError(f"A colour must be text like '#02EB3C', got {type(text).__name__}.")
    raw = text.strip()
    digits = raw[1:] if raw.startswith("#") else raw
    shown = repr(raw[:40] + ("..." if len(raw) > 40 else ""))
    if not digits:
        raise Flux2KitError(f"{shown} is not a HEX colour: it is empty. Write #RGB or #RRGGBB, e.g. #02EB3C.")
    if not _HEX.fullmatch(digits):
        bad = sorted({c for c in digits if c not in "0123456789abcdefABCDEF"})
        raise Flux2KitError(f"{shown} is not a HEX colour: {''.join(bad)[:10]!r} is not a hex digit (0-9, A-F). "
                            "Write #RGB or #RRGGBB, e.g. #02EB3C.")
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    elif len(digits) == 8:
        if digits[6:].upper() != "FF":
            raise Flux2KitError(f"{shown} has transparency (alpha {digits[6:]}); a prompt colour is opaque. "
                                f"Use #{digits[:6].upper()}.")
        digits = digits[:6]
    elif len(digits) != 6:
        raise Flux2KitError(f"{shown} is not a HEX colour: it has {len(digits)} hex digits. Write 3 (#RGB) or 6 "
                            "(#RRGGBB), e.g. #02EB3C.")
    return "#" + digits.upper()


def hex_to_rgb(hex_color: str) -> tuple[int, int, int]:
    h = parse_hex(hex_color)
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def rgb_to_hex(rgb) -> str:
    r, g, b = (int(round(float(c))) for c in rgb)
    return f"#{r:02X}{g:02X}{b:02X}"


# -- CIELAB and CIEDE2000 -----------------------------------------------------------------------

_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb) -> np.ndarray:
    """8-bit sRGB (..., 3) -> CIELAB (..., 3) under D65 (2 degree observer)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def ciede2000(lab1, lab2, k_l: float = 1.0, k_c: float = 1.0, k_h: float = 1.0) -> np.ndarray:
    """CIEDE2000 colour difference between CIELAB colours (broadcasting over leading axes).

    Follows Sharma, Wu and Dalal, "The CIEDE2000 Color-Difference Formula: Implementation Notes,
    Supplementary Test Data, and Mathematical Observations" (2005), equations 1-17.
    """
    lab1, lab2 = np.asarray(lab1, dtype=np.float64), np.asarray(lab2, dtype=np.float64)
    L1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    L2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    h1p = np.where((a1p == 0) & (b1 == 0), 0.0, h1p)
    h2p = np.where((a2p == 0) & (b2 == 0), 0.0, h2p)

    d_l = L2 - L1
    d_c = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    d_h = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))

    l_bar = (L1 + L2) / 2
    cp_bar = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_bar = np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    h_bar = np.where(c1p * c2p == 0, h_sum, h_bar)
    t = (1 - 0.17 * np.cos(np.radians(h_bar - 30)) + 0.24 * np.cos(np.radians(2 * h_bar))
         + 0.32 * np.cos(np.radians(3 * h_bar + 6)) - 0.20 * np.cos(np.radians(4 * h_bar - 63)))
    d_theta = 30 * np.exp(-(((h_bar - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
    s_c = 1 + 0.045 * cp_bar
    s_h = 1 + 0.015 * cp_bar * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    tl, tc, th = d_l / (k_l * s_l), d_c / (k_c * s_c), d_h / (k_h * s_h)
    return np.sqrt(tl**2 + tc**2 + th**2 + r_t * tc * th)


_NAMES = list(CSS_COLORS)
_NAME_LABS = srgb_to_lab([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in CSS_COLORS.values()])


def nearest_color_name(hex_color: str) -> str:
    """The CSS named colour nearest to ``hex_color`` by CIEDE2000, written as words ("lime green")."""
    distances = ciede2000(srgb_to_lab(hex_to_rgb(hex_color))[None, :], _NAME_LABS)
    return _NAMES[int(np.argmin(distances))]  # ties: the first in alphabetical order


# -- palettes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PaletteColor:
    """One palette entry: canonical ``#RRGGBB``, its nearest CSS name, and the object it colours (or "")."""

    hex: str
    name: str
    object: str = ""
    weight: float | None = None  # share of the image, for colours extracted from one

    @classmethod
    def make(cls, color: str, obj: str = "", weight: float | None = None) -> PaletteColor:
        h = parse_hex(color)
        return cls(h, nearest_color_name(h), " ".join(str(obj).split()), weight)


def check_palette_size(n: int, where: str = "The palette") -> None:
    if n > MAX_PALETTE_COLORS:
        raise Flux2KitError(f"{where} has {n} colours; at most {MAX_PALETTE_COLORS} are allowed (BFL recommends 3-5: "
                            "each extra colour weakens the others). Keep the colours that matter.")


def parse_color_lines(text: str) -> list[PaletteColor]:
    """Typed colours, one per line (or separated by ';'): ``#02EB3C the vase`` or ``ff6b6b: the wall``.

    Every bad line is reported at once, with its line number.
    """
    colors, problems = [], []
    entries = [(number, line.strip()) for number, line in enumerate(text.replace(";", "\n").splitlines(), start=1)
               if line.strip() and not line.strip().startswith("//")]
    check_palette_size(len(entries))  # before naming each: a pasted list can be huge
    for number, line in entries:
        code, obj = (line.split(None, 1) + [""])[:2]  # any whitespace after the code: a space or a tab
        code, obj = code.rstrip(":,"), obj.strip().lstrip(":=-").strip()
        try:
            colors.append(PaletteColor.make(code, obj))
        except Flux2KitError as e:
            problems.append(f"entry {number}: {e}")
    if problems:
        raise Flux2KitError("Typed colours: " + " ".join(problems))
    return colors


def prompt_fragment(colors) -> str:
    """The colours as FLUX.2 follows them: "the vase is color #02EB3C (lime green), palette #FFFFFF (white)"."""
    bound = [f"{c.object} is color {c.hex} ({c.name})" for c in colors if c.object]
    free = [f"{c.hex} ({c.name})" for c in colors if not c.object]
    parts = bound + ([f"color palette {', '.join(free)}"] if free else [])
    return ", ".join(parts)


# -- dominant colours ---------------------------------------------------------------------------

_MAX_SAMPLES = 65536


def image_pixels(image) -> np.ndarray:
    """An image (torch tensor or array: (H, W, C) or (B, H, W, C), floats in [0, 1] or uint8) -> (N, 3) uint8."""
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu()
        image = (image if str(image.dtype) == "torch.uint8" else image.float()).numpy()  # uint8 stays 0-255
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4) or a.size == 0:
        raise Flux2KitError(f"Expected an image (height, width, channels) or a batch of them; got shape {a.shape}.")
    pixels = a.reshape(-1, a.shape[-1])
    if len(pixels) > _MAX_SAMPLES:  # an even, deterministic subsample (every n-th pixel), before any conversion
        pixels = pixels[np.linspace(0, len(pixels) - 1, _MAX_SAMPLES).astype(np.int64)]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    pixels = pixels[:, :3]  # colours of the pixels; transparency is not a colour
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.nan_to_num(pixels.astype(np.float64)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return pixels


def dominant_colors(image, k: int = 5, *, seed: int = 0, iterations: int = 30) -> list[PaletteColor]:
    """The ``k`` dominant colours of an image, most frequent first; deterministic for a given image.

    Weighted k-means in CIELAB over the distinct colours, started by k-means++ with a fixed seed.
    An image with at most ``k`` distinct colours gets exactly those colours back.
    """
    if not 1 <= k <= MAX_PALETTE_COLORS:
        raise Flux2KitError(f"Extract between 1 and {MAX_PALETTE_COLORS} colours, not {k}.")
    pixels = image_pixels(image)
    packed = (pixels[:, 0].astype(np.int64) << 16) | (pixels[:, 1].astype(np.int64) << 8) | pixels[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    rgb = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], axis=1).astype(np.float64)
    weights = counts.astype(np.float64)
    total = weights.sum()
    if len(values) <= k:
        found = [(rgb_to_hex(c), w / total) for c, w in zip(rgb, weights)]
    else:
        labs = srgb_to_lab(rgb)
        labels = _kmeans(labs, weights, k, np.random.default_rng(seed), iterations)
        found = []
        for j in range(k):
            members = labels == j
            if members.any():
                w = weights[members]
                found.append((rgb_to_hex((rgb[members] * w[:, None]).sum(0) / w.sum()), w.sum() / total))
    merged: dict[str, float] = {}
    for h, share in found:
        merged[h] = merged.get(h, 0.0) + share
    ordered = sorted(merged.items(), key=lambda item: (-item[1], item[0]))
    return [PaletteColor.make(h, weight=round(float(share), 4)) for h, share in ordered]


def _kmeans(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """Weighted k-means (Lloyd) with k-means++ seeding; returns each point's cluster index."""
    centers = [points[rng.choice(len(points), p=weights / weights.sum())]]
    nearest = ((points - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = weights * nearest
        if p.sum() <= 0:
            break
        centers.append(points[rng.choice(len(points), p=p / p.sum())])
        nearest = np.minimum(nearest, ((points - centers[-1]) ** 2).sum(1))
    centers = np.array(centers)
    labels = np.zeros(len(points), dtype=np.int64)
    for step in range(iterations):
        d = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
        new = d.argmin(1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(centers)):
            members = labels == j
            if members.any():
                w = weights[members]
                centers[j] = (points[members] * w[:, None]).sum(0) / w.sum()
    return labels


# -- swatches -----------------------------------------------------------------------------------

def _label_color(rgb) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``rgb`` (WCAG relative luminance)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    luminance = float(linear @ [0.2126, 0.7152, 0.0722])
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


def render_swatches(colors, *, swatch_width: int = 128, height: int = 96, labels: bool = True) -> np.ndarray:
    """A strip of colour swatches, labelled with HEX and name: float32 (1, H, W, 3) in [0, 1] (ComfyUI IMAGE)."""
    from PIL import Image, ImageDraw

    colors = list(colors)
    if not colors:
        return np.zeros((1, height, swatch_width, 3), dtype=np.float32)
    canvas = Image.new("RGB", (swatch_width * len(colors), height))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(colors):
        rgb = hex_to_rgb(c.hex)
        x0 = i * swatch_width
        draw.rectangle([x0, 0, x0 + swatch_width - 1, height - 1], fill=rgb)
        if labels:
            ink = _label_color(rgb)
            lines = [c.hex, c.name] + ([c.object] if c.object else [])
            for row, line in enumerate(lines):
                draw.text((x0 + 6, 6 + 14 * row), line[:20], fill=ink)
    return (np.asarray(canvas, dtype=np.float32) / 255.0)[None]
