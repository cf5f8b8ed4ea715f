"""GGUF files (llama.cpp's format; ComfyUI-GGUF's and the public FLUX.2 conversions'): header, tensors, metadata.

A :class:`GGUFFile` is the same kind of object as a safetensors ``TensorFile`` (``keys`` / ``info`` /
``get`` / ``metadata``), so the checkpoint inspections and loaders read either. Every tensor is a view
of one memory map of the file: nothing is copied into RAM until a loader copies it (and the GGUF
layers never do: they keep these views, see ``models/gguf_linear.py``).

- ``info(key)`` describes the float tensor ``get(key)`` returns (F32/F16/BF16 as stored; every
  quantized type dequantized to F32), so code written for safetensors (FP8 quantize, save) works
  unchanged on GGUF files.
- ``packed(key)`` is the stored bytes, ``(*rows, bytes_per_row)`` uint8 (blocks run along the last
  dimension, so selecting, splitting or permuting rows is legal on packed bytes), and
  ``tensor(key).ggml_type`` their type.

The header is parsed here rather than with ``gguf.GGUFReader``: the reader builds one numpy array per
element of every metadata array, which takes 10-15 s on the tokenizer (150k tokens + 150k-270k merges)
every Mistral or Qwen3 GGUF carries, for each inspection (``bench/gguf_forward.py`` measures both). The
layout is gguf's (constants, type ids and block sizes come from the ``gguf`` package), and the tests
check this reader against ``GGUFReader`` tensor by tensor and field by field. Arrays are decoded only
when asked for (``field``).
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import Flux2KitError, UnsupportedFormatError
from .safetensors import TensorFile, TensorInfo

MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}  # gguf.GGUFValueType ids -> struct formats; 8 is STRING, 9 ARRAY
_STRING, _ARRAY = 8, 9


def _gguf():
    try:
        import gguf
    except ImportError:  # a ComfyUI install that skipped requirements.txt
        raise Flux2KitError("Reading GGUF files needs the gguf package, which flux2kit's requirements list: run "
                            "pip install -r requirements.txt in the flux2kit folder (or pip install gguf), then "
                            "restart.") from None
    return gguf


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lives in the file and how it is stored."""

    name: str
    ggml_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (rows, ..., columns); the file stores the reverse
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The packed shape: every dimension as in ``shape`` but the last, which counts bytes."""
        block, size = _gguf().GGML_QUANT_SIZES[self.ggml_type]
        return (*self.shape[:-1], self.shape[-1] // block * size)


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, decoded only when read (``GGUFFile.field``): tokenizers hold 100k+ strings."""

    item_type: int
    count: int
    offset: int


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a file that starts with GGUF's magic bytes (whatever its name)."""
    try:
        with open(os.fspath(path), "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def open_weights(path: str | os.PathLike):
    """The tensors of one weight file: a :class:`GGUFFile` for GGUF, a safetensors ``TensorFile`` otherwise."""
    return GGUFFile(path) if is_gguf(path) else TensorFile.open(path)


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from the mapped header; running past the end means a truncated file."""

    def __init__(self, buffer, size: int):
        self.buffer, self.size, self.pos = buffer, size, 0

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        value = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += n
        return value if len(value) > 1 else value[0]

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise _Truncated
        raw = bytes(self.buffer[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")


class GGUFTensors:
    """The TensorFile interface over GGUF tensors; subclasses give ``keys``, ``tensor`` and ``packed``."""

    name = "<gguf>"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def tensor(self, key: str) -> GGUFTensor:
        raise NotImplementedError

    def packed(self, key: str) -> torch.Tensor:
        """The stored bytes, ``(*rows, bytes_per_row)`` uint8."""
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:
        return key in set(self.keys())

    def info(self, key: str) -> TensorInfo:
        """The float tensor ``get`` returns: F32/F16/BF16 as stored, quantized types as F32."""
        t = self.tensor(key)
        return TensorInfo(t.type_name if t.type_name in ("F32", "F16", "BF16") else "F32", t.shape)

    def items_info(self):
        for key in self.keys():
            yield key, self.info(key)

    def get(self, key: str) -> torch.Tensor:
        """The tensor as floats: a view for F32/F16/BF16, an fp32 dequantized copy for quantized types."""
        from .gguf_quants import dequantize

        t = self.tensor(key)
        return dequantize(self.packed(key), t.ggml_type, t.shape, torch.float32, keep_half=True)

    def type_mix(self, keys=None) -> dict[str, tuple[int, int]]:
        """``{type name: (tensors, bytes)}`` over ``keys`` (default: all), largest share first."""
        count: Counter = Counter()
        size: Counter = Counter()
        for key in self.keys() if keys is None else keys:
            t = self.tensor(key)
            count[t.type_name] += 1
            size[t.type_name] += t.nbytes
        return {name: (count[name], size[name]) for name, _ in size.most_common()}

    def check_supported(self, keys=None) -> None:
        """Refuse tensors stored in a type flux2kit cannot dequantize, naming it and the supported ones."""
        from .gguf_quants import SUPPORTED_TYPES

        for key in self.keys() if keys is None else keys:
            t = self.tensor(key)
            if t.ggml_type not in SUPPORTED_TYPES:
                raise UnsupportedFormatError(
                    f"{self.name} stores {key} as {t.type_name}, a GGUF quantization flux2kit cannot run. Supported: "
                    f"{supported_type_names()}. Download a file in one of those (e.g. the Q4_K_M or Q8_0 one)."
                )


class GGUFFile(GGUFTensors):
    """One GGUF file seen as name -> tensor (``keys`` / ``info`` / ``get``), plus ``packed`` bytes and metadata."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        if not os.path.isfile(self.path):
            raise Flux2KitError(f"Model file not found: {self.path}. Check the path or put the file in the models folder.")
        self.size = os.path.getsize(self.path)
        if self.size < 24:
            raise Flux2KitError(f"{self.name} is empty or truncated ({self.size} bytes). Download it again.")
        # Copy-on-write: pages are shared with the page cache until written (nothing writes them), and
        # numpy/torch see a writable buffer, so torch.from_numpy needs no copy and warns about nothing.
        self._map = np.memmap(self.path, mode="c", dtype=np.uint8)
        self.fields: dict[str, object] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        try:
            self._parse()
        except _Truncated:
            self._map = None
            raise Flux2KitError(
                f"{self.name} is truncated: its GGUF header ends past the end of the file ({self.size} bytes). "
                "The download did not finish; download it again."
            ) from None
        except BaseException:
            self._map = None
            raise

    # -- parsing ----------------------------------------------------------------------------------

    def _parse(self) -> None:
        gguf = _gguf()
        cur = _Cursor(self._map, self.size)
        if bytes(self._map[:4]) != MAGIC:
            raise Flux2KitError(f"{self.name} is not a GGUF file (no GGUF magic at its start).")
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            swapped = version & 0xFFFF == 0
            raise UnsupportedFormatError(
                f"{self.name} is a {'big-endian ' if swapped else ''}GGUF file of version "
                f"{struct.unpack('>I', struct.pack('<I', version))[0] if swapped else version}; flux2kit reads "
                "little-endian GGUF versions 2 and 3 (what llama.cpp and ComfyUI-GGUF write). Convert it again."
            )
        n_tensors, n_kv = cur.take("<QQ")
        if n_tensors > self.size or n_kv > self.size:
            raise _Truncated
        for _ in range(n_kv):
            key = cur.string()
            self.fields[key] = self._value(cur, cur.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I")
            if n_dims > _MAX_DIMS:
                raise Flux2KitError(f"{self.name}: tensor {name} has {n_dims} dimensions; the file is damaged.")
            dims = [cur.take("<Q") for _ in range(n_dims)]
            type_id, offset = cur.take("<I"), cur.take("<Q")
            try:
                ggml_type = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedFormatError(
                    f"{self.name}: tensor {name} is stored as GGML type id {type_id}, which the installed gguf "
                    f"package ({getattr(gguf, '__version__', '?')}) does not know; a newer llama.cpp format. "
                    f"flux2kit runs {supported_type_names()}."
                ) from None
            infos.append((name, ggml_type, tuple(int(d) for d in reversed(dims)), offset))
        alignment = self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise Flux2KitError(f"{self.name}: general.alignment {alignment!r} is not a power of two; the file is damaged.")
        data_start = -(-cur.pos // alignment) * alignment
        end = data_start
        for name, ggml_type, shape, offset in infos:
            block, size = gguf.GGML_QUANT_SIZES[ggml_type]
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if shape and shape[-1] % block:
                raise Flux2KitError(f"{self.name}: tensor {name} has rows of {shape[-1]} values, not a multiple of "
                                    f"the {ggml_type.name} block ({block}); the file is damaged.")
            nbytes = n // block * size
            if name in self.tensors:
                raise Flux2KitError(f"{self.name} holds tensor {name} twice; the file is damaged.")
            self.tensors[name] = GGUFTensor(name, ggml_type, shape, data_start + offset, nbytes)
            end = max(end, data_start + offset + nbytes)
        if end > self.size:
            raise Flux2KitError(
                f"{self.name} is truncated: its header describes {end} bytes but the file has {self.size}. "
                "The download did not finish; download it again."
            )

    def _value(self, cur: _Cursor, vtype: int):
        if vtype in _SCALAR_FORMATS:
            return cur.take(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return cur.string()
        if vtype == _ARRAY:
            item_type, count = cur.take("<I"), cur.take("<Q")
            array = GGUFArray(item_type, count, cur.pos)
            self._skip_array(cur, item_type, count)
            return array
        raise Flux2KitError(f"{self.name}: metadata value type {vtype} is not GGUF's; the file is damaged.")

    def _skip_array(self, cur: _Cursor, item_type: int, count: int) -> None:
        if item_type in _SCALAR_FORMATS:
            cur.pos += struct.calcsize(_SCALAR_FORMATS[item_type]) * count
        elif item_type == _STRING:
            for _ in range(count):  # each string is a u64 length and its bytes
                length = cur.take("<Q")
                cur.pos += length
        elif item_type == _ARRAY:
            for _ in range(count):
                sub_type, sub_count = cur.take("<I"), cur.take("<Q")
                self._skip_array(cur, sub_type, sub_count)
        else:
            raise Flux2KitError(f"{self.name}: metadata array of type {item_type}; the file is damaged.")
        if cur.pos > cur.size:
            raise _Truncated

    # -- metadata -----------------------------------------------------------------------------------

    def field(self, key: str, default=None):
        """A metadata value: int, float, bool, str, or a list for arrays (decoded now); ``default`` if absent."""
        value = self.fields.get(key, default)
        if isinstance(value, GGUFArray):
            cur = _Cursor(self._require_map(), self.size)
            cur.pos = value.offset
            return self._decode_array(cur, value.item_type, value.count)
        return value

    def _decode_array(self, cur: _Cursor, item_type: int, count: int) -> list:
        if item_type == _ARRAY:
            return [self._decode_array(cur, cur.take("<I"), cur.take("<Q")) for _ in range(count)]
        if item_type in _SCALAR_FORMATS:  # numbers in one go (token types, scores: 100k+ items)
            dtype = np.dtype(_SCALAR_FORMATS[item_type].replace("?", "b1"))
            if cur.pos + dtype.itemsize * count > cur.size:
                raise _Truncated
            values = np.frombuffer(cur.buffer, dtype=dtype, count=count, offset=cur.pos).tolist()
            cur.pos += dtype.itemsize * count
            return values
        return [self._value(cur, item_type) for _ in range(count)]

    def array_length(self, key: str) -> int | None:
        """How many items a metadata array holds, without decoding it; None if absent or not an array."""
        value = self.fields.get(key)
        return value.count if isinstance(value, GGUFArray) else None

    @property
    def architecture(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    @property
    def metadata(self) -> dict[str, str]:
        """Scalar and string metadata as strings (what a safetensors header's metadata holds)."""
        return {k: str(v) for k, v in self.fields.items() if not isinstance(v, GGUFArray)}

    # -- tensors ------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def tensor(self, key: str) -> GGUFTensor:
        return self.tensors[key]

    def packed(self, key: str) -> torch.Tensor:
        """The stored bytes, ``(*rows, bytes_per_row)`` uint8: a view of the file's memory map, no copy."""
        t = self.tensors[key]
        data = self._require_map()[t.offset:t.offset + t.nbytes]
        return torch.from_numpy(data).view(t.byte_shape)

    def _require_map(self):
        if self._map is None:
            raise Flux2KitError(f"{self.name} was closed; open it again to read its tensors.")
        return self._map

    def close(self) -> None:
        """Drop this object's reference to the memory map; tensors already taken keep theirs."""
        self._map = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def supported_type_names() -> str:
    from .gguf_quants import SUPPORTED_TYPES

    return ", ".join(t.name for t in SUPPORTED_TYPES)


def describe_mix(mix: dict[str, tuple[int, int]]) -> str:
    """``Q4_K 16.92 GB (91%), Q5_K 1.26 GB (7%), BF16 0.50 GB (3%), F32 0.01 GB``: a file's mix by bytes."""
    total = sum(size for _, size in mix.values()) or 1
    parts = []
    for name, (_, size) in mix.items():
        amount = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        share = f" ({100 * size / total:.0f}%)" if size / total >= 0.005 else ""
        parts.append(f"{name} {amount}{share}")
    return ", ".join(parts)


def packed_layers(files, prefix: str = "") -> dict[str, object]:
    """``{layer without prefix: GGML type}`` of the 2-D weights a GGUF file keeps packed (every type but F32).

    Empty for any other kind of file: the loaders swap in GGUF layers only for these.
    """
    if not isinstance(files, GGUFTensors):
        return {}
    out = {}
    for key in files.keys():
        if key.startswith(prefix) and key.endswith(".weight"):
            t = files.tensor(key)
            if len(t.shape) == 2 and t.type_name != "F32":
                out[key[len(prefix):-len(".weight")]] = t.ggml_type
    return out
