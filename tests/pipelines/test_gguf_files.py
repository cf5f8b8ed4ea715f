"""GGUF files: our header reader against gguf's own GGUFReader, dequantization against gguf.quants.dequantize
(the reference implementation) and diffusers', and the errors for damaged or unsupported files."""

import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from flux2kit.pipelines.demo_models.gguf import QUANTIZABLE, RANDOM_ONLY, encode
from flux2kit.pipelines.errors import Flux2KitError, UnsupportedFormatError
from flux2kit.pipelines.files import gguf_quants
from flux2kit.pipelines.files.gguf import GGUFFile, describe_mix, is_gguf, open_weights
from flux2kit.pipelines.files.safetensors import TensorFile

ALL_TYPES = tuple(t for t in QUANTIZABLE + RANDOM_ONLY if t not in ("F32", "F16"))  # every block type flux2kit runs


def write(path, tensors, kv=None, arch="flux"):
    """tensors: name -> (type name, stored array); kv: key -> (writer method, value)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (method, value) in (kv or {}).items():
        getattr(w, method)(key, value)
    for name, (t, stored) in tensors.items():
        if t in ("F32", "F16"):
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, stored, raw_dtype=T[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    """A file with one (16, 512) tensor of every supported type, a 1-D F32 and a 3-D F16; and the dequantized values."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((16, 512)).astype(np.float32) * 0.1
    tensors, expected = {}, {}
    for t in ALL_TYPES:
        stored, deq = encode(values, t, rng)
        tensors[f"w.{t}"] = (t, stored)
        expected[f"w.{t}"] = deq
    tensors["bias"] = ("F32", values[0].copy())
    expected["bias"] = values[0]
    cube = values.reshape(4, 4, 512).astype(np.float16)
    tensors["cube"] = ("F16", cube)
    expected["cube"] = cube.astype(np.float32)
    kv = {"general.name": ("add_string", "tiny"), "x.eps": ("add_float32", 1e-5), "x.flag": ("add_bool", True),
          "x.count": ("add_uint64", 2**40), "x.neg": ("add_int32", -3), "x.ids": ("add_array", [3, 1, 4, 1, 5]),
          "x.words": ("add_array", ["<s>", "héllo", "🦊", "a b"]), "x.floats": ("add_array", [0.5, -1.25])}
    path = write(tmp_path_factory.mktemp("gguf") / "every_type.gguf", tensors, kv)
    return path, expected


def test_reader_matches_ggufs_own_reader(every_type):
    path, _ = every_type
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.keys() == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensor(t.name)
        assert (mine.ggml_type, mine.offset, mine.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes), t.name
        assert mine.shape == tuple(reversed(t.shape.tolist()))  # torch order; the file stores ggml order
        assert np.array_equal(ours.packed(t.name).numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = ours.field(key)
        if isinstance(expected, float):
            assert got == pytest.approx(expected)
        elif isinstance(expected, list) and expected and isinstance(expected[0], float):
            assert got == pytest.approx(expected)
        else:
            assert got == expected, key
    assert ours.architecture == "flux" and ours.array_length("x.words") == 4 and ours.array_length("general.name") is None
    assert ours.metadata["x.flag"] == "True" and "x.words" not in ours.metadata  # arrays stay out of the string view


@pytest.mark.parametrize("t", ALL_TYPES + ("F32", "F16"))
def test_dequantize_is_bit_exact_with_gguf(every_type, t):
    path, expected = every_type
    f = GGUFFile(path)
    key = f"w.{t}" if t not in ("F32", "F16") else {"F32": "bias", "F16": "cube"}[t]
    got = f.get(key).float().numpy()
    assert np.array_equal(got, expected[key]), np.abs(got - expected[key]).max()
    info = f.info(key)
    assert info.dtype == (t if t in ("F32", "F16", "BF16") else "F32") and info.shape == expected[key].shape
    # the reference implementation agrees on the same bytes
    ref = gguf.quants.dequantize(f.packed(key).numpy(), f.tensor(key).ggml_type)
    assert np.array_equal(got, ref.reshape(got.shape))


@pytest.mark.parametrize("t", [t for t in ALL_TYPES if t != "BF16"])
def test_diffusers_default_dequantization_rounds_through_fp16(every_type, t):
    """Why flux2kit passes dtype=fp32 to diffusers' block functions: their default keeps the scales in fp16."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    path, expected = every_type
    f = GGUFFile(path)
    default = dequantize_gguf_tensor(GGUFParameter(f.packed(f"w.{t}").clone(), quant_type=T[t]))
    ref = expected[f"w.{t}"]
    scale = np.abs(ref).max()
    err = np.abs(default.float().numpy() - ref).max()
    if t == "IQ4_NL":  # its lookup table is fp32 and its one scale multiplies once: exact either way
        assert err == 0
    else:
        assert 0 < err < 2e-3 * scale, err  # about one fp16 rounding
        assert default.dtype == (torch.float32 if t == "IQ4_XS" else torch.float16)
    ours = gguf_quants.dequantize(f.packed(f"w.{t}"), T[t], ref.shape, torch.float32)
    assert np.array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_into_a_half_dtype_rounds_once(every_type, dtype):
    path, expected = every_type
    f = GGUFFile(path)
    for t in ("Q8_0", "Q4_K", "Q6_K", "IQ4_XS"):
        got = gguf_quants.dequantize(f.packed(f"w.{t}"), T[t], (16, 512), dtype)
        assert got.dtype == dtype
        assert torch.equal(got, torch.from_numpy(expected[f"w.{t}"]).to(dtype))


def test_chunked_dequantization_equals_one_pass(every_type, monkeypatch):
    path, expected = every_type
    f = GGUFFile(path)
    monkeypatch.setattr(gguf_quants, "CHUNK_VALUES", 3 * 512)  # 3 rows at a time, a ragged last chunk
    for t in ("Q8_0", "Q2_K", "Q5_1"):
        assert np.array_equal(f.get(f"w.{t}").numpy(), expected[f"w.{t}"])


def test_packed_tensors_are_views_of_the_file(every_type):
    path, _ = every_type
    f = GGUFFile(path)
    packed = f.packed("w.Q4_K")
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (16, 512 // 256 * 144)
    base = f._map  # noqa: SLF001 - the test looks at the mapping itself
    assert np.shares_memory(packed.numpy(), base)  # no copy: a view of the memory map
    assert f.get("cube").dtype == torch.float16 and np.shares_memory(f.get("cube").numpy(), base)


def test_type_mix_and_dispatch(every_type, tmp_path):
    path, _ = every_type
    f = GGUFFile(path)
    mix = f.type_mix()
    assert mix["Q8_0"] == (1, 16 * 544) and mix["F32"] == (1, 512 * 4) and sum(n for n, _ in mix.values()) == len(f.keys())
    assert list(mix)[0] == "F32" or mix[list(mix)[0]][1] == max(size for _, size in mix.values())  # largest first
    assert describe_mix({"Q4_K": (400, 16_920_000_000), "BF16": (8, 500_000_000), "F32": (300, 10_000_000)}) == \
        "Q4_K 16.92 GB (97%), BF16 0.50 GB (3%), F32 10.0 MB"
    assert is_gguf(path) and isinstance(open_weights(path), GGUFFile)
    from safetensors.torch import save_file

    st = str(tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(2)}, st)
    assert not is_gguf(st) and isinstance(open_weights(st), TensorFile)


def test_truncated_files_are_refused(every_type, tmp_path):
    path, _ = every_type
    data = open(path, "rb").read()
    for cut, where in ((10, "empty or truncated"), (200, "header ends past the end"), (len(data) - 100, "describes")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(Flux2KitError, match=f"truncated.*{where}|{where}.*") as e:
            GGUFFile(bad)
        assert "download it again" in str(e.value).lower()


def test_unsupported_and_unknown_types_are_named(tmp_path):
    rng = np.random.default_rng(1)
    path = write(tmp_path / "iq2.gguf", {"w": ("IQ2_XXS", rng.integers(0, 255, (4, 66), dtype=np.uint8)),
                                         "ok": ("F32", np.zeros(4, np.float32))})
    f = GGUFFile(path)
    f.check_supported(["ok"])
    with pytest.raises(UnsupportedFormatError, match=r"stores w as IQ2_XXS.*Supported: F32, BF16, F16, Q8_0, Q6_K, .*Q4_K.*IQ4_XS, Q3_K, Q2_K\."):
        f.check_supported()
    # a type id the gguf package does not know (a newer llama.cpp format)
    raw = bytearray(open(path, "rb").read())
    ti = raw.index(b"ok") + 2 + 4 + 8  # name, n_dims, one dim: then the type id
    raw[ti:ti + 4] = (250).to_bytes(4, "little")
    (tmp_path / "future.gguf").write_bytes(bytes(raw))
    with pytest.raises(UnsupportedFormatError, match="GGML type id 250"):
        GGUFFile(tmp_path / "future.gguf")


def test_not_gguf_and_missing(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\x07\x00\x00\x00" + bytes(40))
    with pytest.raises(UnsupportedFormatError, match="version 7"):
        GGUFFile(tmp_path / "x.gguf")
    with pytest.raises(Flux2KitError, match="not found"):
        GGUFFile(tmp_path / "nope.gguf")
    assert not os.path.exists(tmp_path / "nope.gguf")


def test_a_gguf_where_only_safetensors_work(tmp_path, every_type):
    """The VAE loader reads safetensors only: a GGUF there is named as such, with what to download."""
    import shutil

    from flux2kit.pipelines.models.vae import load_vae

    path, _ = every_type
    shutil.copy(path, tmp_path / "flux2-vae.safetensors")  # a GGUF under a safetensors name: the bytes decide
    with pytest.raises(UnsupportedFormatError, match="is a GGUF file. flux2kit reads GGUF FLUX.2 transformers and "
                                                     "text encoders.*download the .safetensors version"):
        load_vae(str(tmp_path / "flux2-vae.safetensors"), device="cpu")
