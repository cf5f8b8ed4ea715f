"""HEX parsing, CSS names by CIEDE2000 (against Sharma et al.'s published test data), dominant colours, swatches."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import flux2kit
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.prompting.palette import (CSS_COLORS, MAX_PALETTE_COLORS, PaletteColor, check_palette_size, ciede2000,
                                        dominant_colors, nearest_color_name, parse_color_lines, parse_hex,
                                        prompt_fragment, render_swatches, srgb_to_lab)


@pytest.mark.parametrize("text,expected", [
    ("#02EB3C", "#02EB3C"), ("#02eb3c", "#02EB3C"), ("02eb3c", "#02EB3C"), ("02EB3c", "#02EB3C"),
    ("#abc", "#AABBCC"), ("ABC", "#AABBCC"), ("#aBc", "#AABBCC"), ("fff", "#FFFFFF"), ("#000", "#000000"),
    ("  #123456\n", "#123456"), ("#ff6b6bff", "#FF6B6B"), ("FF6B6BFF", "#FF6B6B"), ("#09f", "#0099FF"),
])
def test_valid_hex_forms(text, expected):
    assert parse_hex(text) == expected


@pytest.mark.parametrize("text,message", [
    ("#GGG", "'G' is not a hex digit"), ("#12345", "5 hex digits"), ("", "empty"), ("#", "empty"),
    ("##fff", "'#' is not a hex digit"), ("#1234567", "7 hex digits"), ("12", "2 hex digits"),
    ("#abcdefg", "'g' is not a hex digit"), ("#ab cd", "' ' is not a hex digit"), ("rgb(1,2,3)", "not a hex digit"),
    ("#ff6b6b80", "transparency"), ("0x02EB3C", "'x' is not a hex digit"), ("#1234", "4 hex digits"),
    ("   ", "empty"), ("lime", "not a hex digit"),
])
def test_invalid_hex_forms_say_what_to_write(text, message):
    with pytest.raises(Flux2KitError, match="HEX colour|transparency") as e:
        parse_hex(text)
    assert message in str(e.value)
    assert "#RRGGBB" in str(e.value) or "Use #" in str(e.value)


HEX_CASES = Path(flux2kit.__file__).resolve().parent / "web" / "tests" / "hex_cases.json"


def hex_case_mismatches(parse) -> list[str]:
    """Where ``parse`` disagrees with web/tests/hex_cases.json, the cases the browser's normalizeHex is tested on."""
    cases = json.loads(HEX_CASES.read_text(encoding="utf-8"))
    out = []
    for text, expected in cases["accepted"]:
        try:
            got = parse(text)
        except Flux2KitError as e:
            got = f"refused ({e})"
        if got != expected:
            out.append(f"{text!r}: {got} instead of {expected}")
    for text in cases["refused"]:
        try:
            out.append(f"{text!r}: accepted as {parse(text)}")
        except Flux2KitError:
            pass
    return out


def test_parse_hex_accepts_and_refuses_what_the_browser_does():
    cases = json.loads(HEX_CASES.read_text(encoding="utf-8"))
    assert len(cases["accepted"]) >= 10 and len(cases["refused"]) >= 10
    assert hex_case_mismatches(parse_hex) == []


def test_shared_hex_cases_catch_a_parser_that_keeps_any_alpha():
    """Mutation: an 8-digit form loses its alpha whatever it is (parse_hex refuses all but FF)."""
    def any_alpha(text):
        s = text.strip() if isinstance(text, str) else text
        return parse_hex(s[:-2] if isinstance(s, str) and len(s.lstrip("#")) == 8 else text)

    assert any(m.startswith("'#ff6b6b80'") for m in hex_case_mismatches(any_alpha))


def test_non_text_colour():
    with pytest.raises(Flux2KitError, match="must be text"):
        parse_hex(0x02EB3C)


# Sharma, Wu, Dalal (2005), Table 1: L1 a1 b1, L2 a2 b2, CIEDE2000 (all 34 pairs).
SHARMA = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]


def test_ciede2000_matches_sharmas_test_data():
    data = np.array(SHARMA)
    got = ciede2000(data[:, 0:3], data[:, 3:6])
    np.testing.assert_allclose(got, data[:, 6], atol=5e-5)  # the table is rounded to 4 decimals
    np.testing.assert_allclose(ciede2000(data[:, 3:6], data[:, 0:3]), got, atol=1e-12)  # symmetric
    assert float(ciede2000([50, 10, -10], [50, 10, -10])) == 0.0


def test_srgb_to_lab_reference_values():
    # D65 reference white maps to L=100; sRGB red is L*a*b* (53.24, 80.09, 67.20) (Lindbloom's calculator)
    np.testing.assert_allclose(srgb_to_lab([255, 255, 255]), [100, 0, 0], atol=1e-3)
    np.testing.assert_allclose(srgb_to_lab([0, 0, 0]), [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.01)
    np.testing.assert_allclose(srgb_to_lab([0, 0, 255]), [32.30, 79.19, -107.86], atol=0.01)


def test_every_css_colour_names_itself():
    assert len(CSS_COLORS) == 139  # CSS Color 4's 148 keywords less aqua/fuchsia aliases and grey spellings
    for name, hex_color in CSS_COLORS.items():
        assert nearest_color_name(hex_color) == name, name


@pytest.mark.parametrize("hex_color,name", [
    ("#FE0101", "red"), ("#7F7F7F", "gray"), ("#010180", "navy"), ("#02EB3C", "lime"), ("#FF6B6B", "salmon"),
    ("#FFFFFE", "white"), ("#010101", "black"), ("#F5F5DD", "beige"), ("#31CC33", "lime green"),
    ("#123456", "midnight blue"), ("#FFD801", "gold"),
])
def test_nearest_names_for_known_colours(hex_color, name):
    assert nearest_color_name(hex_color) == name


def test_palette_colour_and_fragment():
    colors = [PaletteColor.make("#02eb3c", "  the   vase "), PaletteColor.make("fff"), PaletteColor.make("000")]
    assert colors[0] == PaletteColor("#02EB3C", "lime", "the vase")
    assert prompt_fragment(colors) == ("the vase is color #02EB3C (lime), color palette #FFFFFF (white), "
                                       "#000000 (black)")
    assert prompt_fragment(colors[:1]) == "the vase is color #02EB3C (lime)"


def test_typed_colour_lines():
    colors = parse_color_lines("#02EB3C the vase\nff6b6b: the wall\n\n  #abc  \n// a comment\n000;fff the sky")
    assert [(c.hex, c.object) for c in colors] == [("#02EB3C", "the vase"), ("#FF6B6B", "the wall"), ("#AABBCC", ""),
                                                   ("#000000", ""), ("#FFFFFF", "the sky")]
    with pytest.raises(Flux2KitError) as e:
        parse_color_lines("#GGG the vase\n#02EB3C\n#12345")
    assert "entry 1: '#GGG'" in str(e.value) and "entry 3: '#12345'" in str(e.value) and "entry 2" not in str(e.value)


def test_palette_size_limit():
    check_palette_size(MAX_PALETTE_COLORS)
    with pytest.raises(Flux2KitError, match="200 colours; at most 16"):
        check_palette_size(200)


def _blocks(colors_and_rows, width=40):
    """An image of horizontal bands: [(rgb 0-255, rows), ...]."""
    rows = [np.tile(np.array(rgb, dtype=np.uint8), (n, width, 1)) for rgb, n in colors_and_rows]
    return np.concatenate(rows)


def test_dominant_colours_recovers_flat_colours_exactly():
    bands = [((2, 235, 60), 50), ((255, 107, 107), 30), ((30, 58, 95), 15), ((245, 245, 220), 5)]
    img = _blocks(bands)
    as_float = torch.from_numpy(img.astype(np.float32) / 255.0)[None]  # ComfyUI IMAGE (1, H, W, 3)
    for image in (img, as_float):
        got = dominant_colors(image, 4)
        assert [c.hex for c in got] == ["#02EB3C", "#FF6B6B", "#1E3A5F", "#F5F5DC"]
        assert [c.weight for c in got] == [0.5, 0.3, 0.15, 0.05]
    assert [c.hex for c in dominant_colors(img, 8)] == ["#02EB3C", "#FF6B6B", "#1E3A5F", "#F5F5DC"]


def test_dominant_colours_clusters_noisy_colours():
    rng = np.random.default_rng(1)
    centers = [(200, 30, 40), (20, 120, 220), (250, 220, 60)]
    img = _blocks([(c, n) for c, n in zip(centers, (60, 30, 10))], width=50).astype(np.int64)
    noisy = np.clip(img + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    got = dominant_colors(noisy, 3)
    for c, center in zip(got, centers):  # most frequent first
        rgb = [int(c.hex[i:i + 2], 16) for i in (1, 3, 5)]
        assert max(abs(a - b) for a, b in zip(rgb, center)) <= 1, (c.hex, center)
    assert got == dominant_colors(noisy, 3)  # deterministic
    assert [c.weight for c in got] == [0.6, 0.3, 0.1]


def test_dominant_colours_of_a_large_gradient_is_deterministic():
    y, x = np.mgrid[0:600, 0:700]
    img = np.stack([x * 255 // 699, y * 255 // 599, (x + y) * 255 // 1298], -1).astype(np.uint8)
    a, b = dominant_colors(img, 5), dominant_colors(img, 5)
    assert a == b and len(a) == 5 and abs(sum(c.weight for c in a) - 1) < 1e-3


def test_dominant_colours_bad_input():
    with pytest.raises(Flux2KitError, match="between 1 and 16"):
        dominant_colors(np.zeros((4, 4, 3)), 0)
    with pytest.raises(Flux2KitError, match="Expected an image"):
        dominant_colors(np.zeros((4, 4)), 3)
    gray_alpha = dominant_colors(np.full((2, 4, 4, 1), 0.5), 2)  # grayscale batch
    assert [c.hex for c in gray_alpha] == ["#808080"]


def test_swatches_show_each_colour():
    colors = [PaletteColor.make("#02EB3C", "the vase"), PaletteColor.make("#1E3A5F")]
    img = render_swatches(colors, swatch_width=100, height=80)
    assert img.shape == (1, 80, 200, 3) and img.dtype == np.float32
    assert np.allclose(img[0, 70, 90], np.array([2, 235, 60]) / 255)  # corners are free of label text
    assert np.allclose(img[0, 70, 190], np.array([30, 58, 95]) / 255)
    label_pixels = img[0, :50, :100].reshape(-1, 3)
    assert (np.abs(label_pixels - np.array([2, 235, 60]) / 255).max(1) > 0.5).any()  # a label was drawn
    assert render_swatches([]).shape[0] == 1


def test_typed_colours_limit_is_checked_before_naming_each_one():
    import time

    start = time.perf_counter()
    with pytest.raises(Flux2KitError, match="The palette has 200000 colours; at most 16"):
        parse_color_lines("#02EB3C the vase\n" * 200_000)
    assert time.perf_counter() - start < 2  # was about a minute: every line was named first
    assert [(c.hex, c.object) for c in parse_color_lines("#02EB3C\tthe vase")] == [("#02EB3C", "the vase")]


def test_dominant_colours_of_a_big_batch_converts_only_the_sample():
    import tracemalloc

    batch = np.zeros((4, 1024, 1024, 3), dtype=np.float32)
    batch[:, :512] = [1.0, 0.0, 0.0]
    tracemalloc.start()
    try:
        got = dominant_colors(batch, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(c.hex, c.weight) for c in got] == [("#000000", 0.5), ("#FF0000", 0.5)]
    assert peak < 100e6  # converting the whole batch to float64 first took 300 MB here (2 GB for 8 x 2048^2)
    as_uint8 = torch.from_numpy((batch[:1, :8, :8] * 255).astype(np.uint8))  # a uint8 tensor is 0-255, not 0-1
    assert [c.hex for c in dominant_colors(as_uint8, 2)] == ["#FF0000"]
