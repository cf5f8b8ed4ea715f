"""Batch inputs: rows (JSONL, CSV), sweeps and keys resolved into one API workflow per job, checked."""

from __future__ import annotations

import csv
import decimal
import itertools
import json
import os
import re
from dataclasses import dataclass

from ...pipelines.errors import Flux2KitError
from ..workflow.graph import find_node, id_key, is_link
from ..workflow.overrides import parse_value
from ..workflow.schema import check_workflow, combo_options, input_names, is_image_input, spec_of, spec_type
from .records import Job

ALIASES = {"steps": "num_inference_steps"}
NAME_WIDTH = 5


@dataclass(frozen=True)
class Problem:
    """Something wrong with the inputs, found before anything runs, and where it was found."""

    row: int | None  # the inputs file's row, from 1; None without an inputs file (then the job says where)
    job: int | None  # the job number, from 1; None for a row that makes no job (not readable)
    message: str


def read_rows(path: str) -> list[tuple[int, object]]:
    """(row number from 1, dict or a problem message) for each data row of a .jsonl or .csv file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise Flux2KitError(f"{path}: the CSV file has no header row (the keys, e.g. prompt,6.seed).")
                rows = []
                for n, row in enumerate(reader, start=1):
                    if None in row:
                        rows.append((n, f"{len(row[None])} more cell(s) than the header has columns"))
                    else:
                        rows.append((n, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}))
                return rows
            if not path.lower().endswith((".jsonl", ".ndjson", ".json")):
                raise Flux2KitError(f"{path}: inputs must be a .jsonl file (one JSON object per line) or a .csv file.")
            rows, n = [], 0
            for line in f:
                if not line.strip():
                    continue
                n += 1
                try:
                    row = json.loads(line)
                except ValueError as e:
                    rows.append((n, f"not valid JSON ({e})"))
                    continue
                rows.append((n, {k: v for k, v in row.items() if v is not None} if isinstance(row, dict)
                             else f"a JSON {type(row).__name__}, not an object of key: value"))
            return rows
    except FileNotFoundError:
        raise Flux2KitError(f"Inputs file not found: {path}.") from None
    except UnicodeDecodeError as e:
        raise Flux2KitError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 (in Excel: CSV UTF-8).") from None
    except csv.Error as e:
        raise Flux2KitError(f"{path}: not a readable CSV file ({e}).") from None
    except OSError as e:
        raise Flux2KitError(f"Cannot read the inputs file {path}: {e}") from None


def parse_sweep(text: str) -> tuple[str, list]:
    """``KEY=A..B`` (inclusive), ``KEY=A..B:STEP`` (whole or decimal numbers: ``0..1:0.25``), ``KEY=a,b,c``
    or ``KEY=["a, b", "c"]``."""
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or not spec:
        raise Flux2KitError(f"--sweep {text!r}: expected KEY=VALUES, e.g. seed=1..100 or prompt=a,b,c.")
    number = r"-?\d+(?:\.\d+)?"
    m = re.fullmatch(rf"({number})\s*\.\.\s*({number})(?:\s*:\s*({number}))?", spec)
    if m:
        # Decimal arithmetic: 0..1:0.1 gives 0.3, not 0.30000000000000004, and ends exactly at 1.
        start, stop, step = (decimal.Decimal(g) for g in (m.group(1), m.group(2), m.group(3) or "1"))
        if step <= 0 or stop < start:
            raise Flux2KitError(f"--sweep {text!r}: a range goes up, e.g. 1..100, 0..90:10 or 0..1:0.25.")
        values = [start + i * step for i in range(int((stop - start) // step) + 1)]
        whole = all("." not in (g or "") for g in m.groups())
        return key, [int(v) if whole else float(v) for v in values]
    if spec.startswith("["):
        try:
            values = json.loads(spec)
        except ValueError as e:
            raise Flux2KitError(f"--sweep {text!r}: not a JSON list ({e}).") from None
        if not isinstance(values, list) or not values:
            raise Flux2KitError(f"--sweep {text!r}: give a non-empty JSON list.")
        return key, values
    return key, [v.strip() for v in spec.split(",") if v.strip()]


class Plan:
    """The jobs of a batch: workflow (API format) x rows x sweeps, resolved and checked."""

    def __init__(self, workflow: dict, rows: list[tuple[int, object]] | None, sweeps: list[tuple[str, list]],
                 settings: list[str], base_dir: str):
        self.workflow, self.sweeps, self.settings, self.base_dir = workflow, sweeps, settings, base_dir
        self.rows = rows if rows is not None else [(None, {})]

    def jobs(self, object_info: dict) -> tuple[list[Job], list[Problem]]:
        """(jobs, problems): every job planned, and what is wrong with the inputs (nothing runs if anything is)."""
        jobs, problems = [], []
        fixed = {}
        for setting in self.settings:
            key, sep, value = setting.partition("=")
            if not sep:
                raise Flux2KitError(f"--set {setting!r}: expected KEY=VALUE, e.g. 5.num_inference_steps=8.")
            fixed[key.strip()] = value
        combos = list(itertools.product(*[[(k, v) for v in values] for k, values in self.sweeps])) or [()]
        for row_number, row in self.rows:
            if isinstance(row, str):
                problems.append(Problem(row=row_number, job=None, message=row))
                continue
            for combo in combos:
                index = len(jobs) + 1
                values = {k: v for k, v in row.items() if not k.startswith("_")}
                values.update(dict(combo))
                meta = {k: v for k, v in row.items() if k.startswith("_")}
                wf = json.loads(json.dumps(self.workflow))
                assigned, images, own = {}, {}, []
                for key, value in fixed.items():
                    own += self._apply(wf, key, value, object_info, assigned, images, os.getcwd(), text=True)
                for key, value in values.items():
                    own += self._apply(wf, key, value, object_info, assigned, images, self.base_dir,
                                       text=isinstance(value, str))
                own += self._check_images(wf, object_info, images)
                own += check_workflow(wf, object_info, skip=lambda nid, name, wf=wf: is_image_input(
                    object_info.get(wf[nid]["class_type"]) or {}, name))
                problems += [Problem(row=row_number, job=index, message=p) for p in own]
                name = job_name(index, meta.get("_name"), values, images)
                jobs.append(Job(index=index, row=row_number, values=values, meta=meta, name=name, workflow=wf,
                                images={f"{nid}.{inp}": p for (nid, inp), p in images.items()}, assigned=assigned))
        return jobs, problems

    def _apply(self, wf, key, value, object_info, assigned, images, base_dir, text) -> list[str]:
        """Set one key in ``wf``; problems as messages."""
        try:
            targets = targets_of(wf, key)
        except Flux2KitError as e:
            return [f"{key}: {e}"]
        problems = []
        for nid, name in targets:
            node = wf[nid]
            current = node["inputs"].get(name)
            if is_link(current):
                problems.append(f"{key}: input {name!r} of node #{nid} ({node['class_type']}) is connected to node "
                                f"#{current[0]}; only values can be set")
                continue
            info = object_info.get(node["class_type"]) or {}
            spec = spec_of(info, name)
            if key == "size" and name in ("width", "height"):
                m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(value))
                if not m:
                    return [f"size: expected WIDTHxHEIGHT such as 512x512, got {value!r}"]
                node["inputs"][name] = int(m.group(1) if name == "width" else m.group(2))
                assigned[f"{nid}.{name}"] = node["inputs"][name]
                continue
            if info and spec is None:
                problems.append(f"{key}: node #{nid} ({node['class_type']}) has no input {name!r}; it has "
                                f"{', '.join(input_names(info))}")
                continue
            if spec is not None and is_image_input(info, name) and isinstance(value, str):
                path = value if os.path.isabs(value) else os.path.join(base_dir, value)
                if os.path.isfile(path):
                    images[(nid, name)] = os.path.abspath(path)
                    node["inputs"][name] = os.path.abspath(path)
                else:
                    node["inputs"][name] = value  # maybe a file already in the server's input folder
                assigned[f"{nid}.{name}"] = node["inputs"][name]
                continue
            try:
                node["inputs"][name] = _coerce(value, current, spec, text)
            except Flux2KitError as e:
                problems.append(f"{key}: {e}")
                continue
            assigned[f"{nid}.{name}"] = node["inputs"][name]
        return problems

    def _check_images(self, wf, object_info, images) -> list[str]:
        """Image inputs that are neither a local file (to upload) nor a file the target already has."""
        problems = []
        for nid in sorted(wf, key=id_key):
            node = wf[nid]
            info = object_info.get(node["class_type"]) or {}
            for name, value in node["inputs"].items():
                if (nid, name) in images or is_link(value) or not isinstance(value, str):
                    continue
                if not is_image_input(info, name):
                    continue
                if os.path.isfile(value):  # a path in the workflow or --set, relative to the current folder
                    images[(nid, name)] = node["inputs"][name] = os.path.abspath(value)
                    continue
                if value not in combo_options(spec_of(info, name)):
                    problems.append(f"node #{nid} ({node['class_type']}): image {value!r} is not a file (relative "
                                    f"paths in rows are read from {self.base_dir}) nor in the target's input folder")
        return problems


def targets_of(wf: dict, key: str) -> list[tuple[str, str]]:
    """(node id, input name) pairs a key sets."""
    if key == "size":
        both = [nid for nid, n in wf.items() if {"width", "height"} <= n["inputs"].keys()]
        if not both:
            raise Flux2KitError("no node in the workflow has width and height inputs")
        return [(nid, name) for nid in sorted(both, key=id_key) for name in ("width", "height")]
    if "." not in key:
        name = ALIASES.get(key, key)
        hits = [nid for nid, n in wf.items() if name in n["inputs"] and not is_link(n["inputs"][name])]
        if not hits:
            raise Flux2KitError(f"no node in the workflow has a {name!r} value; use NODE.INPUT (NODE an id, title or "
                                f"class type)")
        return [(nid, name) for nid in sorted(hits, key=id_key)]
    # NODE.INPUT; titles may hold dots, nested input names too: try every split, last dot first.
    parts = key.split(".")
    first_error = None
    for cut in range(len(parts) - 1, 0, -1):
        ref, name = ".".join(parts[:cut]), ".".join(parts[cut:])
        try:
            return [(find_node(wf, ref), name)]
        except Flux2KitError as e:
            first_error = first_error or e
    raise first_error


def _coerce(value, current, spec, text: bool):
    """A row's value in the type of the input: CSV text parsed; JSON numbers widened to float where needed."""
    kind = spec_type(spec) if spec is not None else None
    model = current
    if model is None:
        model = {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": "", "COMBO": ""}.get(kind)
    if isinstance(value, str) and (text or not isinstance(model, str)) and model is not None:
        if isinstance(model, (int, float)) and not isinstance(model, bool) and kind == "FLOAT":
            model = 0.0
        return parse_value(value, model)
    if kind == "FLOAT" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _slug(text: str, words: int = 5) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return "-".join(text.split("-")[:words])


def job_name(index: int, given, values: dict, images: dict) -> str:
    """``00007-seed-3-a-red-fox``: the job number (unique, stable) and a slug of its values."""
    if given:
        slug = _slug(given, 12)
    else:
        parts = []
        image_paths = set(images.values())
        for key, value in values.items():
            short = key.rpartition(".")[2]
            if isinstance(value, str) and (value in image_paths or os.path.sep in value or
                                           value.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))):
                parts.append(_slug(os.path.splitext(os.path.basename(value))[0], 3))
            elif isinstance(value, str):
                parts.append(_slug(value))
            else:
                parts.append(f"{_slug(ALIASES.get(short, short), 2)}-{_slug(json.dumps(value), 2)}")
        slug = "-".join(p for p in parts if p)
    slug = slug[:60].strip("-")
    return f"{index:0{NAME_WIDTH}d}" + (f"-{slug}" if slug else "")


def problem_report(problems: list[Problem], total_rows: int) -> str:
    """One message per problem, with the rows it concerns (``rows 1-3, 7``; job numbers for sweeps alone)."""
    by_message: dict[str, list[Problem]] = {}
    for problem in problems:
        by_message.setdefault(problem.message, []).append(problem)
    lines = []
    for message, found in by_message.items():
        rows = sorted({p.row for p in found if p.row is not None})
        jobs = sorted({p.job for p in found if p.row is None and p.job is not None})
        if total_rows > 1 and rows == list(range(1, total_rows + 1)):
            where = "every row"
        elif rows:
            where = ("row " if len(rows) == 1 else "rows ") + _ranges(rows)
        else:
            where = ("job " if len(jobs) == 1 else "jobs ") + _ranges(jobs)
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)
