"""Structured JSON prompts in Black Forest Labs' schema: build, validate, serialise, check references.

BFL's base schema (FLUX.2 prompting guide)::

    {"scene", "subjects": [{"description", "position", "action", "pose", "color_palette"}], "style",
     "color_palette": ["#hex", ...], "lighting", "mood", "background", "composition",
     "camera": {"angle", "lens", "depth_of_field"}}

plus ``text_elements`` for typography (exact text, font, size, placement, colour) and a subject's
``reference`` ("image 2") naming a reference image by its number. The prompt FLUX.2 reads is the
compact JSON string (fewer tokens than indented JSON), keys in the order above; the text encoder
takes it as it takes any prompt.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re

from ..errors import Flux2KitError
from ..parameters import MAX_TEXT_TOKENS
from .palette import MAX_PALETTE_COLORS, parse_hex

FIELDS = ("scene", "subjects", "style", "color_palette", "lighting", "mood", "background", "composition", "camera",
          "text_elements")
SUBJECT_FIELDS = ("description", "position", "action", "pose", "color_palette", "reference")
CAMERA_FIELDS = ("angle", "lens", "depth_of_field")
TEXT_FIELDS = ("text", "font", "size", "placement", "color")

MAX_PROMPT_CHARS = 100_000  # FLUX.2 [dev] reads 512 tokens (about 2,000 characters); the API up to 32K tokens
MAX_DEPTH = 8  # the schema nests 3 levels (subjects[0].color_palette[0]); extra fields get a little more
MAX_ITEMS = 32  # subjects or text elements in one prompt
MAX_TOKENS = MAX_TEXT_TOKENS
MAX_REFERENCES = 10
_TEMPLATE_TOKENS = 40  # the system message and chat markup the text encoder adds around every prompt

# "#" with its own optional space: "\s*#?\s*" would try every split of a long run of spaces (quadratic).
# Only plural "images" takes a list ("images 1 and 3"): after "image 1 and 3 cats", the 3 counts cats.
_IMAGE_MENTION = re.compile(r"\b(?:images\s*(?:#\s*)?(\d+(?:\s*(?:,|and|&|or)\s*(?:#\s*)?\d+)*)|image\s*(?:#\s*)?(\d+))",
                            re.IGNORECASE)
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


class _Object(dict):
    """A parsed JSON object that remembers keys it saw twice (json keeps only the last value)."""

    duplicates: tuple = ()


def _object_pairs(pairs):
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen = set()
        obj.duplicates = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def path_str(path) -> str:
    """("subjects", 1, "color_palette", 0) -> "subjects[1].color_palette[0]"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


# -- building -----------------------------------------------------------------------------------

def _text(value) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def palette_entries(colors) -> list[str]:
    """Palette colours (PaletteColor, or HEX strings) -> the JSON list: "#02EB3C", or "#02EB3C for the vase"."""
    out = []
    for c in colors or ():
        if isinstance(c, str):
            out.append(parse_hex(c))
        else:
            out.append(f"{c.hex} for {c.object}" if getattr(c, "object", "") else c.hex)
    return out


def build_subject(description: str, *, position: str = "", action: str = "", pose: str = "", color_palette=(),
                  reference: int = 0) -> dict:
    """One subject; empty fields are left out. ``reference`` > 0 names reference image N."""
    subject = {"description": _text(description), "position": _text(position), "action": _text(action),
               "pose": _text(pose), "color_palette": palette_entries(color_palette),
               "reference": f"image {int(reference)}" if reference else ""}
    return {k: v for k, v in subject.items() if v}


def build_text_element(text: str, *, font: str = "", size: str = "", placement: str = "", color: str = "") -> dict:
    """One typography element. The text is kept exactly (spaces, quotes, Unicode); FLUX.2 renders it verbatim."""
    element = {"text": str(text), "font": _text(font), "size": _text(size), "placement": _text(placement),
               "color": parse_hex(color) if str(color or "").strip() else ""}
    return {k: v for k, v in element.items() if v}


def build_prompt(*, scene: str = "", subjects=(), style: str = "", color_palette=(), lighting: str = "",
                 mood: str = "", background: str = "", composition: str = "", camera_angle: str = "",
                 camera_lens: str = "", depth_of_field: str = "", text_elements=(),
                 reference_count: int | None = None) -> dict:
    """A validated prompt dict in schema order; empty fields are left out. Raises listing every problem."""
    camera = {k: v for k, v in zip(CAMERA_FIELDS, map(_text, (camera_angle, camera_lens, depth_of_field))) if v}
    data = {"scene": _text(scene), "subjects": list(subjects or ()), "style": _text(style),
            "color_palette": palette_entries(color_palette), "lighting": _text(lighting), "mood": _text(mood),
            "background": _text(background), "composition": _text(composition), "camera": camera,
            "text_elements": list(text_elements or ())}
    data = {k: v for k, v in data.items() if v}
    if not data:
        raise Flux2KitError("The JSON prompt is empty: fill in at least the scene, or connect a subject.")
    return validate(data, reference_count=reference_count)


def to_prompt_string(data: dict) -> str:
    """Compact JSON (no spaces, Unicode as is) with keys in schema order: the prompt FLUX.2 reads."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def pretty(data: dict) -> str:
    """Indented JSON for the preview on the node."""
    return json.dumps(data, ensure_ascii=False, indent=2)


# -- parsing and validation ---------------------------------------------------------------------

def _check_size_and_depth(text: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise Flux2KitError(f"The prompt is {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,} (FLUX.2 [dev] "
                            "reads 512 tokens, about 2,000 characters). Paste only the JSON prompt, and shorten it.")
    # Nesting is measured before json.loads, whose recursion would otherwise fail on deep input.
    skeleton = _STRING_LITERAL.sub("", text)
    depth = max(itertools.accumulate((1 if c in "[{" else -1) for c in skeleton if c in "[]{}"), default=0)
    if depth > MAX_DEPTH:
        raise Flux2KitError(f"The JSON prompt nests {depth} levels deep; at most {MAX_DEPTH} are allowed (the schema "
                            "uses 3: subjects[0].color_palette[0]). Flatten it to the schema's fields.")


def parse_prompt(text: str, *, reference_count: int | None = None) -> dict:
    """A pasted JSON prompt -> the validated, normalised dict. One error lists every problem with its path."""
    if not isinstance(text, str):
        raise Flux2KitError(f"A JSON prompt is text; got {type(text).__name__}.")
    _check_size_and_depth(text)
    if not text.strip():
        raise Flux2KitError("The JSON prompt is empty: paste a JSON object such as {\"scene\": \"...\"}.")
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise Flux2KitError(_decode_error(text, e)) from None
    except ValueError as e:  # an integer literal longer than Python converts (4,300 digits)
        raise Flux2KitError(f"The JSON prompt has a number too long to read ({str(e)[:80]}). Shorten it.") from None
    except RecursionError:  # not reached after the depth check; kept so no input can crash the node
        raise Flux2KitError(f"The JSON prompt nests too deeply; at most {MAX_DEPTH} levels are allowed.") from None
    return validate(data, reference_count=reference_count)


def _refuse_constant(name: str):
    raise Flux2KitError(f"The JSON prompt contains {name}, which is not valid JSON (json.loads accepts it, other "
                        "readers do not). Write a number or text instead.")


def _number(digits: str) -> int:
    """Decimal digits -> int; absurdly long numbers (which int() refuses past 4,300 digits) read as 10**9."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else 10**9


def _decode_error(text: str, e: json.JSONDecodeError) -> str:
    lines = text.split("\n")  # json counts lines by "\n" only; splitlines() also splits at \u2028, \x1c, ...
    line = lines[e.lineno - 1] if e.lineno <= len(lines) else ""
    start = max(0, e.colno - 30)
    snippet = line[start:e.colno + 20]
    hint = ""
    if text.lstrip()[:1] not in ("{", "["):
        hint = " This looks like plain text: plain prompts go straight into the prompt input; this node takes JSON."
    elif "'" in snippet and '"' not in snippet:
        hint = " JSON needs double quotes (\") around names and text, not single quotes."
    elif re.search(r",\s*[}\]]", text[max(0, e.pos - 5):e.pos + 5]):
        hint = " Remove the comma before the closing bracket."
    return (f"The JSON prompt is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
            f" (near {snippet!r}).{hint} Fix that spot, or build the prompt with FLUX.2 JSON Prompt.")


def validate(data, *, reference_count: int | None = None) -> dict:
    """Check ``data`` against the schema; returns it normalised (schema key order, canonical HEX).

    Every problem is collected, then one Flux2KitError lists them all with their field paths
    (``subjects[1].color_palette[0]: ...``). ``reference_count``, when given (> 0), is the number of
    reference images the prompt runs with: "image N" beyond it is a problem.
    """
    problems: list[str] = []

    def problem(path, message):
        problems.append(f"{path_str(path)}: {message}")

    if not isinstance(data, dict):
        raise Flux2KitError(f"A JSON prompt is an object ({{\"scene\": ...}}), not {_kind(data)}. Wrap the fields in "
                            "{ }.")
    out = _fields(data, (), FIELDS, problem, _top_field)
    for path in _unencodable(out, ()):
        problem(path, "contains a lone UTF-16 surrogate (an escape like \\ud800 without its pair), which no text "
                      "encoder can read; remove it or write the character itself")
    if reference_count:
        for path, number in _mentions(out, ()):
            if not 1 <= number <= reference_count:
                problem(path, f"names image {number}, but {reference_count} reference image"
                              f"{'s are' if reference_count != 1 else ' is'} wired (image 1"
                              f"{f' to image {reference_count}' if reference_count > 1 else ''}); wire more images "
                              "or fix the number")
    if problems:
        head = (f"The JSON prompt has {len(problems)} problems" if len(problems) > 1
                else "The JSON prompt has a problem")
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        message = head + ":\n- " + "\n- ".join(shown)
        raise Flux2KitError(message.encode("utf-8", "backslashreplace").decode("utf-8"))  # paths may hold surrogates
    return out


def _unencodable(value, path):
    """Paths of strings (keys or values) that cannot be written as UTF-8: lone surrogates from JSON escapes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _unencodable(k, path + (k,))
            yield from _unencodable(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _unencodable(v, path + (i,))


def _kind(value) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true/false"
    return "null" if value is None else "a number"


def _fields(obj: dict, path, known, problem, check_field) -> dict:
    """Known keys in schema order (each checked by ``check_field``), then unknown keys as they came."""
    for key in getattr(obj, "duplicates", ()):
        problem(path + (key,), "appears twice; only the last value would be kept. Merge them into one")
    out = {}
    for key in known:
        if key in obj:
            out[key] = check_field(key, obj[key], path + (key,), problem)
    for key, value in obj.items():
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if close:
            problem(path + (key,), f"unknown field; did you mean {close[0]!r}?")
        out[key] = _plain(value)  # extra fields are allowed (the schema is a base) and passed on as they are
    return out


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _string(value, path, problem, *, numbers: bool = False):
    if isinstance(value, str) or (numbers and isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    problem(path, f"must be text, not {_kind(value)}")
    return value


def _top_field(key, value, path, problem):
    if key == "subjects":
        return _list_of_objects(value, path, problem, SUBJECT_FIELDS, _subject_field, "subject",
                                '{"description": "..."}')
    if key == "text_elements":
        return _list_of_objects(value, path, problem, TEXT_FIELDS, _text_field, "text element",
                                '{"text": "..."}')
    if key == "color_palette":
        return _palette(value, path, problem)
    if key == "camera":
        if not isinstance(value, dict):
            problem(path, f'must be an object like {{"angle": "...", "lens": "...", "depth_of_field": "..."}}, '
                          f"not {_kind(value)}")
            return _plain(value)
        return _fields(value, path, CAMERA_FIELDS, problem, lambda k, v, p, pr: _string(v, p, pr))
    return _string(value, path, problem)


def _list_of_objects(value, path, problem, known, check_field, what, example):
    if not isinstance(value, list):
        problem(path, f"must be a list of {what}s [{example}, ...], not {_kind(value)}")
        return _plain(value)
    if len(value) > MAX_ITEMS:
        problem(path, f"has {len(value)} {what}s; at most {MAX_ITEMS} are allowed")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            problem(path + (i,), f"must be an object like {example}, not {_kind(item)}")
            out.append(_plain(item))
            continue
        required = known[0]
        if required not in item:
            problem(path + (i, required), f"is missing; every {what} needs one")
        elif isinstance(item[required], str) and not item[required].strip():
            problem(path + (i, required), "is empty")
        out.append(_fields(item, path + (i,), known, problem, check_field))
    return out


def _subject_field(key, value, path, problem):
    if key == "color_palette":
        return _palette(value, path, problem)
    if key == "reference":
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"image {value}"
        m = re.fullmatch(r"\s*image\s*#?\s*(\d+)\s*", value, re.IGNORECASE) if isinstance(value, str) else None
        if not m:
            problem(path, f'must name a reference image like "image 2", not {value!r}')
            return _plain(value)
        number = _number(m.group(1))
        if not 1 <= number <= MAX_REFERENCES:
            problem(path, f"names image {number}; references are numbered image 1 to image {MAX_REFERENCES}")
        return f"image {number}"
    return _string(value, path, problem)


def _text_field(key, value, path, problem):
    if key == "color":
        return _hex_entry(value, path, problem, suffix=False)
    return _string(value, path, problem, numbers=key == "size")


def _palette(value, path, problem):
    if not isinstance(value, list):
        problem(path, f'must be a list of HEX colours ["#02EB3C", ...], not {_kind(value)}')
        return _plain(value)
    if len(value) > MAX_PALETTE_COLORS:
        problem(path, f"has {len(value)} colours; at most {MAX_PALETTE_COLORS} are allowed (BFL recommends 3-5). "
                      "Keep the colours that matter")
        return _plain(value)
    return [_hex_entry(v, path + (i,), problem) for i, v in enumerate(value)]


def _hex_entry(value, path, problem, *, suffix: bool = True):
    """"#02eb3c" -> "#02EB3C"; with ``suffix``, text may follow the colour: "#FF6B6B (coral pink)"."""
    if not isinstance(value, str):
        problem(path, f'must be a HEX colour like "#02EB3C", not {_kind(value)}')
        return _plain(value)
    code, sep, rest = value.strip().partition(" ")
    if rest and not suffix:
        code, sep, rest = value.strip(), "", ""
    try:
        return parse_hex(code) + (sep + rest if rest else "")
    except Flux2KitError as e:
        problem(path, str(e).rstrip("."))
        return value


# -- references and tokens ----------------------------------------------------------------------

def image_mentions(text: str) -> list[int]:
    """The reference numbers a text names: "image 2", "Image #3", "images 1 and 4" -> [2, 3, 1, 4]."""
    return [_number(n) for m in _IMAGE_MENTION.finditer(text) for n in re.findall(r"\d+", m.group(1) or m.group(2))]


def _mentions(value, path):
    if isinstance(value, str):
        for n in image_mentions(value):
            yield path, n
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _mentions(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _mentions(v, path + (i,))


def check_reference_mentions(prompt: str, reference_count: int) -> None:
    """With references wired, every "image N" in the prompt (text or JSON) must be 1..reference_count.

    Nothing is checked without references: "image 2" may then be ordinary words.
    """
    if not reference_count or not isinstance(prompt, str):
        return
    data = None
    if prompt.lstrip().startswith("{") and len(prompt) <= MAX_PROMPT_CHARS:
        try:
            data = json.loads(prompt)
        except (ValueError, RecursionError):
            data = None
    found = list(_mentions(data, ())) if isinstance(data, dict) else [((), n) for n in image_mentions(prompt)]
    bad = [(path, n) for path, n in found if not 1 <= n <= reference_count]
    if bad:
        where = ", ".join(f"image {n}" + (f" ({path_str(path)})" if path else "") for path, n in bad)
        raise Flux2KitError(f"The prompt names {where}, but {reference_count} reference image"
                            f"{'s are' if reference_count != 1 else ' is'} wired, numbered image 1"
                            f"{f' to image {reference_count}' if reference_count > 1 else ''} in the order wired. "
                            "Wire more reference images or fix the number in the prompt.")


def estimate_tokens(prompt: str) -> int:
    """A deliberately high estimate of the text encoder's token count, for when no tokenizer is at hand.

    One token per 3 bytes of UTF-8 (Mistral's tokenizer averages about 4 characters per token on
    English, less on JSON punctuation), plus the system message and chat markup.
    """
    return _TEMPLATE_TOKENS + math.ceil(len(prompt.encode("utf-8")) / 3)


def token_status(prompt: str, exact: int | None = None, max_tokens: int = MAX_TOKENS) -> tuple[str, bool]:
    """(status line, over the limit?) for the preview: the exact count when a tokenizer counted it."""
    n = exact if exact is not None else estimate_tokens(prompt)
    label = f"{n} of {max_tokens} tokens" if exact is not None else f"about {n} of {max_tokens} tokens (estimate)"
    if n > max_tokens:
        return (f"{label} - WARNING: over {max_tokens}; the text encoder ignores the rest. Shorten the prompt"
                + ("" if exact is not None else " or wire the text encoder for an exact count") + "."), True
    return label, False
