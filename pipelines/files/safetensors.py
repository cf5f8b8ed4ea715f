"""Safetensors files: read the header without loading anything, stream tensors one at a time, write one at a time.

Formats are detected from this header (names, dtypes, shapes, metadata), never from file names.
Weights are read only through ``safetensors`` here; pickles are refused with a message that says what to
download instead, and GGUF files are read by ``gguf.py`` (transformers and text encoders only).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from ..errors import Flux2KitError, UnsupportedFormatError

FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
ST_DTYPES = {  # torch dtype -> safetensors dtype name
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8", torch.int8: "I8",
    torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_DTYPES


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


def _refuse_foreign_file(path: str, head: bytes) -> None:
    name = os.path.basename(path)
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        raise UnsupportedFormatError(
            f"{name} is a pickle checkpoint (.ckpt/.pt/.bin). flux2kit never unpickles files, "
            "because a pickle can run code when it is opened. Download the .safetensors version "
            "of this model instead."
        )
    if head.startswith(b"GGUF"):  # the transformer and text encoder loaders read GGUF (files/gguf.py); nothing else does
        raise UnsupportedFormatError(
            f"{name} is a GGUF file. flux2kit reads GGUF FLUX.2 transformers and text encoders (in their loaders); "
            "this one needs a .safetensors file: download the .safetensors version."
        )


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate a safetensors header; loads no tensor data."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.exists(path):
        raise Flux2KitError(f"Model file not found: {path}. Check the path or put the file in the models folder.")
    if os.path.isdir(path):
        raise Flux2KitError(f"{path} is a folder, not a .safetensors file.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        if not (head[8:9] == b"{" and 0 < header_len <= _MAX_HEADER_BYTES):
            _refuse_foreign_file(path, head)
        if len(head) < 9:
            raise Flux2KitError(f"{name} is empty or truncated ({size} bytes). Download it again.")
        f.seek(8)
        if header_len == 0 or header_len > min(_MAX_HEADER_BYTES, size - 8):
            if header_len > size - 8 and header_len <= _MAX_HEADER_BYTES:
                raise Flux2KitError(f"{name} is truncated (the download did not finish). Download it again.")
            raise Flux2KitError(
                f"{name} is not a safetensors file. flux2kit loads .safetensors checkpoints only."
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Flux2KitError(
            f"{name} is not a safetensors file (its header is not JSON). flux2kit loads .safetensors checkpoints only."
        ) from None
    if not isinstance(header, dict):
        raise Flux2KitError(f"{name} is not a safetensors file (unexpected header).")

    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        try:
            tensors[key] = TensorInfo(str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            data_end = max(data_end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise Flux2KitError(f"{name} has a damaged safetensors header (entry {key!r}). Download it again.") from None
    if 8 + header_len + data_end > size:
        raise Flux2KitError(
            f"{name} is truncated: the header describes {8 + header_len + data_end} bytes but the file has {size}. "
            "The download did not finish; download it again."
        )
    return SafetensorsHeader(path=path, metadata=dict(metadata), tensors=tensors)


@dataclass
class TensorFile:
    """One or more safetensors files (shards) seen as one name -> tensor mapping.

    Tensors are read one at a time (``get``), so a loader streams weights into the model instead
    of holding a second copy of the whole checkpoint.
    """

    headers: list[SafetensorsHeader]
    _owner: dict[str, int] = field(default_factory=dict, repr=False)
    _handles: dict[int, object] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, h in enumerate(self.headers):
            for key in h.tensors:
                self._owner[key] = i

    @classmethod
    def open(cls, paths: str | os.PathLike | Iterable[str | os.PathLike]) -> "TensorFile":
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        return cls([read_header(p) for p in paths])

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for h in self.headers:
            merged.update(h.metadata)
        return merged

    @property
    def name(self) -> str:
        return os.path.basename(self.headers[0].path) if self.headers else "<empty>"

    def keys(self) -> list[str]:
        return list(self._owner)

    def __contains__(self, key: object) -> bool:
        return key in self._owner

    def info(self, key: str) -> TensorInfo:
        return self.headers[self._owner[key]].tensors[key]

    def items_info(self) -> Iterator[tuple[str, TensorInfo]]:
        for h in self.headers:
            yield from h.tensors.items()

    def get(self, key: str) -> torch.Tensor:
        i = self._owner[key]
        handle = self._handles.get(i)
        if handle is None:
            handle = safe_open(self.headers[i].path, framework="pt", device="cpu")
            self._handles[i] = handle
        return handle.get_tensor(key)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def safetensors_files_in(folder: str, stem: str) -> list[str]:
    """The weight files of a diffusers/transformers folder: ``stem.safetensors`` or its shards."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if found:
        return [os.path.join(folder, n) for n in found]
    pickles = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".ckpt", ".pth"))]
    if pickles:
        raise UnsupportedFormatError(
            f"{folder} holds only pickle weights ({pickles[0]}). flux2kit never unpickles files; "
            "download the .safetensors version of this model."
        )
    raise Flux2KitError(f"No .safetensors weights found in {folder}.")


# ----------------------------------------------------------------------------------------------
# A streaming safetensors writer: one tensor in memory at a time


def write_safetensors(path: str | os.PathLike, view, *, metadata: dict[str, str] | None = None) -> None:
    """Write every tensor of ``view`` (``keys``/``info``/``get``) to ``path`` in safetensors format.

    The header comes from the infos alone, then each tensor is produced, checked against its info
    and written; the file appears under its name only when complete.
    """
    path = os.fspath(path)
    header: dict = {}
    offset = 0
    keys = list(view.keys())
    for key in keys:
        info = view.info(key)
        nbytes = _numel(info.shape) * _itemsize(info.dtype)
        header[key] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".partial"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for key in keys:
                t = view.get(key)
                info = view.info(key)
                if ST_DTYPES.get(t.dtype) != info.dtype or tuple(t.shape) != tuple(info.shape):
                    t = t.to(TORCH_DTYPES[info.dtype]) if tuple(t.shape) == tuple(info.shape) else None
                    if t is None:
                        raise Flux2KitError(f"{key}: produced a tensor of another shape than announced; not written.")
                f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)  # no copy
                del t
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):  # disk full, read-only or missing folder: say so, not a traceback
            raise Flux2KitError(
                f"Could not write {path} ({exc.strerror or exc}). It needs {(offset + len(raw) + 8) / 2**30:.2f} GiB "
                "free in a writable folder; nothing was left behind. Free space or choose another location."
            ) from exc
        raise


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()


class StateDictFiles:
    """An in-memory state dict seen as a TensorFile (``keys``/``info``/``get``), for writers."""

    def __init__(self, state: dict[str, torch.Tensor], name: str = "<state dict>"):
        self.state, self.name, self.metadata = state, name, {}
        self._infos = {k: TensorInfo(ST_DTYPES[v.dtype], tuple(v.shape)) for k, v in state.items()}

    def keys(self):
        return list(self.state)

    def __contains__(self, key):
        return key in self.state

    def info(self, key):
        return self._infos[key]

    def items_info(self):
        return iter(self._infos.items())

    def get(self, key):
        return self.state[key]

    def close(self):
        pass
