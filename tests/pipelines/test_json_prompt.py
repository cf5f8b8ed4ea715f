"""JSON prompts: build -> string -> parse round trip, schema errors with paths, limits, reference numbers."""

import json

import pytest

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.prompting.json_prompt import (FIELDS, build_prompt, build_subject, build_text_element,
                                            check_reference_mentions, estimate_tokens, image_mentions,
                                            parse_prompt, pretty, to_prompt_string, token_status, validate)
from flux2kit.pipelines.prompting.palette import PaletteColor


def _scene():
    vase = build_subject("a ceramic vase with a narrow neck", position="right third", action="catching the light",
                         color_palette=[PaletteColor.make("#02eb3c", "the vase")], reference=2)
    cat = build_subject("a sleeping grey cat", pose="curled up", position="left")
    sign = build_text_element('Café "Ωmega" – 你好 🎉 \\ back', font="bold serif", size="large",
                              placement="top center", color="#fff")
    return build_prompt(scene="a sunlit kitchen", subjects=[vase, cat], style="product photo",
                        color_palette=["#1e3a5f", PaletteColor.make("F5F5DC")], lighting="soft window light",
                        mood="calm", background="white tiles", composition="rule of thirds", camera_angle="eye level",
                        camera_lens="85mm", depth_of_field="shallow", text_elements=[sign], reference_count=2)


def test_round_trip_build_string_parse():
    data = _scene()
    text = to_prompt_string(data)
    assert parse_prompt(text) == data
    assert json.loads(text) == data
    assert list(data) == list(FIELDS)  # every field set, in schema order
    assert list(data["camera"]) == ["angle", "lens", "depth_of_field"]
    assert data["subjects"][0] == {"description": "a ceramic vase with a narrow neck", "position": "right third",
                                   "action": "catching the light", "color_palette": ["#02EB3C for the vase"],
                                   "reference": "image 2"}
    assert data["color_palette"] == ["#1E3A5F", "#F5F5DC"]


def test_compact_and_stable():
    text = to_prompt_string(_scene())
    assert "\n" not in text and '", "' not in text and '": "' not in text
    assert to_prompt_string(_scene()) == text
    # key order comes from the schema, not from the order fields were given
    shuffled = json.loads(text, object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert to_prompt_string(validate(shuffled)) == text
    assert parse_prompt(pretty(_scene())) == _scene()  # indented (pasted) JSON parses to the same structure


def test_unicode_and_quotes_in_text_elements_survive_exactly():
    words = 'Café "Ωmega" – 你好 🎉 \\ back'
    text = to_prompt_string(_scene())
    assert "你好 🎉" in text and "Café" in text  # kept as characters (fewer tokens than \\u escapes)
    assert parse_prompt(text)["text_elements"][0]["text"] == words
    assert build_text_element("  two  spaces  ")["text"] == "  two  spaces  "  # the exact text, untouched


def test_empty_fields_are_left_out():
    data = build_prompt(scene="a fox", camera_angle="", subjects=[build_subject("a fox", pose="")])
    assert data == {"scene": "a fox", "subjects": [{"description": "a fox"}]}
    with pytest.raises(Flux2KitError, match="empty"):
        build_prompt()


def _problems(text, **kw):
    with pytest.raises(Flux2KitError) as e:
        parse_prompt(text, **kw)
    return str(e.value)


def test_schema_errors_list_every_problem_with_its_path():
    bad = {
        "scene": 3,
        "subjects": [
            {"description": "a vase", "color_palette": ["#02EB3C", "#GGG", "#12345"]},
            {"pose": "sitting", "color_palette": "#fff"},
            "a dog",
            {"description": "   ", "reference": "photo 3"},
        ],
        "color_palette": ["#abc", 7],
        "camera": {"angle": ["low"], "lens": "85mm"},
        "text_elements": [{"font": "serif"}, {"text": "SALE", "color": "red", "size": 48}],
        "colour_palette": ["#fff"],
        "extra_notes": {"film": "Portra 400"},
    }
    message = _problems(json.dumps(bad))
    expected = [
        "scene: must be text, not a number",
        "subjects[0].color_palette[1]: '#GGG' is not a HEX colour",
        "subjects[0].color_palette[2]: '#12345' is not a HEX colour: it has 5 hex digits",
        "subjects[1].description: is missing",
        "subjects[1].color_palette: must be a list of HEX colours",
        "subjects[2]: must be an object",
        "subjects[3].description: is empty",
        "subjects[3].reference: must name a reference image like \"image 2\"",
        "color_palette[1]: must be a HEX colour like \"#02EB3C\", not a number",
        "camera.angle: must be text, not a list",
        "text_elements[0].text: is missing",
        "text_elements[1].color: 'red' is not a HEX colour",
        "colour_palette: unknown field; did you mean 'color_palette'?",
    ]
    for line in expected:
        assert f"- {line}" in message, line
    assert message.startswith(f"The JSON prompt has {len(expected)} problems:")
    assert "extra_notes" not in message and "size" not in message  # extra fields and numeric sizes are fine


def test_extra_fields_pass_through_after_the_schema_fields():
    data = parse_prompt('{"effects": ["film grain"], "scene": "a fox", "style": "photo"}')
    assert list(data) == ["scene", "style", "effects"] and data["effects"] == ["film grain"]


def test_duplicate_keys_are_reported():
    assert "- scene: appears twice" in _problems('{"scene": "a", "scene": "b"}')
    assert "- subjects[0].description: appears twice" in _problems(
        '{"subjects": [{"description": "a", "description": "b"}]}')


@pytest.mark.parametrize("text,message", [
    ("{'scene': 'a fox'}", "double quotes"),
    ('{"scene": "a fox",}', "Remove the comma"),
    ("a red fox in snow", "plain text"),
    ('{"scene": "a fox"', "line 1, column 18"),
    ('{\n  "scene": "a fox"\n  "mood": "calm"\n}', "line 3, column 3"),
    ("", "empty"),
    ('["a fox"]', "is an object"),
    ("42", "is an object"),
])
def test_invalid_json_is_located(text, message):
    assert message in _problems(text)


def test_200_colours():
    colors = ", ".join(['"#02EB3C"'] * 200)
    assert "color_palette: has 200 colours; at most 16" in _problems(f'{{"color_palette": [{colors}]}}')
    assert "subjects[0].color_palette: has 200 colours" in _problems(
        f'{{"subjects": [{{"description": "x", "color_palette": [{colors}]}}]}}')
    with pytest.raises(Flux2KitError, match="200 colours"):
        build_prompt(scene="x", color_palette=["#02EB3C"] * 200)


def test_a_10_mb_prompt_is_refused_before_parsing():
    huge = '{"scene": "' + "a" * (10 * 1024 * 1024) + '"}'
    assert "10,485,773 characters; the limit is 100,000" in _problems(huge)
    with pytest.raises(Flux2KitError, match="characters"):
        parse_prompt("[" * (10 * 1024 * 1024))


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 15_000 + "1" + "}" * 15_000,
                                  '{"scene": ' + "[" * 9 + '"x"' + "]" * 9 + "}", "[{" * 30_000])
def test_deeply_nested_json_is_a_clear_error(text):
    assert "levels deep; at most 8" in _problems(text)


def test_brackets_inside_text_do_not_count_as_nesting():
    assert parse_prompt('{"scene": "[[[[[[[[[[{{{{{{{{{{ \\" [[[["}')["scene"] == '[[[[[[[[[[{{{{{{{{{{ " [[[['


def test_subject_naming_image_5_with_2_references():
    text = to_prompt_string({"scene": "a room", "subjects": [{"description": "the person from image 1"},
                                                             {"description": "a lamp", "reference": "image 5"}]})
    message = _problems(text, reference_count=2)
    assert "- subjects[1].reference: names image 5, but 2 reference images are wired" in message
    assert parse_prompt(text, reference_count=5)["subjects"][1]["reference"] == "image 5"
    assert parse_prompt(text)["subjects"][1]["reference"] == "image 5"  # no references given: unchecked
    assert "names image 0" in _problems('{"scene": "the chair from image 0"}', reference_count=1)
    with pytest.raises(Flux2KitError, match="names image 3, but 1 reference image is wired"):
        build_prompt(scene="x", subjects=[build_subject("a cat", reference=3)], reference_count=1)
    assert "references are numbered image 1 to image 10" in _problems(
        '{"subjects": [{"description": "x", "reference": "image 11"}]}')


def test_reference_mentions_in_text_and_json_prompts():
    assert image_mentions("the person from Image 1 in the room from image #2, images 3 and 4, image 5, 6") == \
        [1, 2, 3, 4, 5]  # only plural "images" takes a list
    assert image_mentions("the dog from image 1 and 3 cats, images 2, 4 or 5") == [1, 2, 4, 5]
    assert image_mentions("an imaged 3 by image of a fox") == []
    check_reference_mentions("the jacket from image 2 on the person from image 1", 2)
    check_reference_mentions("image 9 as words, no references", 0)
    with pytest.raises(Flux2KitError, match=r"names image 5, but 2 reference images are wired.*Wire more"):
        check_reference_mentions("the jacket from image 5 on the person from image 1", 2)
    json_text = '{"subjects":[{"description":"a","reference":"image 5"}]}'
    with pytest.raises(Flux2KitError, match=r"image 5 \(subjects\[0\]\.reference\)"):
        check_reference_mentions(json_text, 2)


def test_token_status():
    short = to_prompt_string(_scene())
    assert token_status(short)[0].endswith("of 512 tokens (estimate)") and not token_status(short)[1]
    assert estimate_tokens(short) >= 40 + len(short) / 4  # at least one token per 4 characters, plus the template
    status, over = token_status("word " * 400)
    assert over and "WARNING: over 512" in status and "estimate" in status and "wire the text encoder" in status
    status, over = token_status("x", exact=600)
    assert over and status.startswith("600 of 512 tokens - WARNING") and "estimate" not in status
    assert token_status("x", exact=20) == ("20 of 512 tokens", False)


def test_long_runs_of_spaces_after_image_are_linear():
    import time

    start = time.perf_counter()
    assert image_mentions("image" + " " * 50_000 + "x") == []  # was quadratic: minutes at the 100,000-char limit
    assert image_mentions("image" + " " * 50_000 + "# 2") == [2]
    check_reference_mentions("the lamp from image" + " " * 50_000 + "1", 1)
    assert time.perf_counter() - start < 2


def test_huge_numbers_are_clear_errors_not_crashes():
    digits = "1" * 5000  # past Python's 4,300-digit int conversion limit
    with pytest.raises(Flux2KitError, match="number too long"):
        parse_prompt('{"scene": "x", "extra": ' + digits + "}")
    assert "names image 1000000000; references are numbered" in _problems(
        '{"subjects": [{"description": "a", "reference": "image ' + digits + '"}]}')
    assert "names image 1000000000, but 2 reference images" in _problems(
        '{"scene": "the cat from image ' + digits + '"}', reference_count=2)
    with pytest.raises(Flux2KitError, match="names image 1000000000, but 2"):
        check_reference_mentions("the cat from image " + digits, 2)
    assert image_mentions("image 007 and image 0") == [7, 0]


def test_lone_surrogates_and_nan_are_clear_errors():
    message = _problems('{"scene": "a \\ud800 b", "subjects": [{"description": "ok \\udfff"}]}')
    assert "scene: contains a lone UTF-16 surrogate" in message
    assert "subjects[0].description: contains a lone UTF-16 surrogate" in message
    message.encode("utf-8")  # the error itself can be sent to the browser
    assert parse_prompt('{"scene": "\\ud83c\\udf89"}')["scene"] == "🎉"  # a proper pair is one character
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(Flux2KitError, match=f"contains {constant}, which is not valid JSON"):
            parse_prompt('{"scene": "x", "text_elements": [{"text": "a", "size": ' + constant + "}]}")


def test_reference_any_case_and_error_snippet_after_unicode_line_separators():
    assert parse_prompt('{"subjects": [{"description": "a", "reference": "Image #2"}]}')["subjects"][0] == \
        {"description": "a", "reference": "image 2"}
    # U+2028 inside a string is one JSON line, not two: the snippet shows the real spot
    assert '"x": }' in _problems('{"scene": "a\u2028b", "x": }')  # was near '{"scene": "a'
