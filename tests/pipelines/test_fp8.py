"""FP8 weights: quantization, the two matmul paths, auto fallback, loading and memory.

Error bounds come from the formats. Round-to-nearest into e4m3fn (3 mantissa bits) has
relative error at most u = 2^-4 for normal values; below the smallest normal (2^-6, in
scaled units) the absolute error is at most half the subnormal spacing, 2^-10. For e5m2
(2 mantissa bits, smallest normal 2^-14, subnormal spacing 2^-16): u = 2^-3 and 2^-17.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from flux2kit.pipelines.errors import Flux2KitError, UnsupportedFormatError
from flux2kit.pipelines.files.fp8 import FP8_DTYPES, dequantize_weight, fp8_max, quantize_weight
from flux2kit.pipelines.models import fp8_linear as fp8
from flux2kit.pipelines.models.fp8_linear import FP8Linear, fp8_linears, scaled_mm_supported, set_fp8_matmul

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (unit roundoff, half the subnormal spacing) in scaled units
ROUNDING = {E4M3: (2.0**-4, 2.0**-10), E5M2: (2.0**-3, 2.0**-17)}
K, N, M = 256, 128, 64


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_layer(seed=0, *, bias=False, per_row=False, weight_dtype=E4M3, input_scale=None):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.02)
    layer = FP8Linear.from_linear(lin, per_row=per_row, weight_dtype=weight_dtype)
    if input_scale is None:
        return layer
    sd = {**layer.state_dict(), "input_scale": torch.tensor(float(input_scale))}
    static = FP8Linear(K, N, bias, weight_dtype=weight_dtype, per_row=per_row, has_input_scale=True)
    static.load_state_dict(sd, assign=True)
    return static


def both_paths(layer, x):
    layer.matmul = "dequant"
    ref = layer(x)
    layer.matmul = "scaled_mm"
    return layer(x), ref


# --- quantize / dequantize -------------------------------------------------------------


def test_fp8_max_and_dtypes():
    assert FP8_DTYPES == {"float8_e4m3fn": E4M3, "float8_e5m2": E5M2}
    assert fp8_max(E4M3) == 448.0 and fp8_max(E5M2) == 57344.0
    with pytest.raises(UnsupportedFormatError):
        fp8_max(torch.bfloat16)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("per_row", [False, True])
def test_round_trip_within_format_bound(dtype, per_row):
    """Each element: |w - deq(q(w))| <= u|w| + 2^-10 * scale (e4m3; 2^-3, 2^-17 for e5m2)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_weight(w, per_row=per_row, dtype=dtype)
    assert q.dtype == dtype and scale.dtype == torch.float32
    assert scale.shape == ((N,) if per_row else ())
    back = dequantize_weight(q, scale, torch.float32)
    u, sub = ROUNDING[dtype]
    s = scale[:, None] if per_row else scale
    bound = u * w.abs() + sub * s
    assert ((back - w).abs() <= bound * (1 + 1e-5)).all()
    assert rel_err(back, w) < u  # a Frobenius error of at most the worst case per element


def test_per_row_beats_per_tensor_on_rows_of_different_magnitude():
    """Rows spanning 1e-3..1e2: one tensor scale pushes small rows into subnormals."""
    w = torch.randn(64, K, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 2, 64)[:, None]

    def row_errors(per_row):
        q, s = quantize_weight(w, per_row=per_row)
        return (dequantize_weight(q, s, torch.float32) - w).norm(dim=1) / w.norm(dim=1)

    tensor_rows, row_rows = row_errors(False), row_errors(True)
    assert row_rows.max() < 2.0**-4  # measured ~0.030
    assert tensor_rows.max() > 0.25  # measured ~0.44 on the smallest rows
    assert row_rows.mean() < tensor_rows.mean()


def test_dequantize_matches_comfyui_formula_and_zero_weights():
    q, s = quantize_weight(torch.randn(N, K))
    assert torch.equal(dequantize_weight(q, s, torch.bfloat16), (q.float() * s).to(torch.bfloat16))
    q0, s0 = quantize_weight(torch.zeros(4, 32), per_row=True)
    assert torch.equal(s0, torch.ones(4)) and not dequantize_weight(q0, s0, torch.float32).any()


# --- the dequant path --------------------------------------------------------------------


@pytest.mark.parametrize("per_row", [False, True])
def test_dequant_forward_is_bitwise_f_linear(per_row):
    layer = make_layer(bias=True, per_row=per_row)
    layer.matmul = "dequant"
    x = torch.randn(2, 7, K)
    expected = F.linear(x, dequantize_weight(layer.weight, layer.weight_scale, torch.float32), layer.bias)
    assert torch.equal(layer(x), expected)


# --- the scaled_mm path, forced on CPU --------------------------------------------------

CASES = [
    ("tensor", dict()),
    ("tensor, static input_scale", dict(input_scale="calibrated")),
    ("per-row", dict(per_row=True)),
    ("per-row, static input_scale", dict(per_row=True, input_scale="calibrated")),
    ("e5m2 tensor", dict(weight_dtype=E5M2)),
    ("e5m2 per-row", dict(weight_dtype=E5M2, per_row=True)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("x_mag", [1e-3, 1.0, 1e3])
def test_scaled_mm_error_vs_dequant(name, kw, x_mag):
    """Both paths share the FP8 weight, so they differ only by activation quantization to
    e4m3fn with scale s: per output, |y_mm - y_deq| <= sum_k (u|x_k| + 2^-10 s)|w_jk|,
    u = 2^-4. Relative (Frobenius) error is therefore below 2^-4; measured ~0.026 for
    Gaussian inputs at every magnitude, static and dynamic scales, e4m3 and e5m2 weights."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)) * x_mag
    s = x.abs().amax().item() / 448
    if kw.get("input_scale") == "calibrated":
        kw = {**kw, "input_scale": s * 1.25}  # a calibration range wider than this batch
    layer = make_layer(**kw)
    y, ref = both_paths(layer, x)
    scale_a = kw.get("input_scale", s)
    w_abs = layer.dequantized_weight(torch.float32).abs()
    bound = 2.0**-4 * x.abs() @ w_abs.t() + 2.0**-10 * scale_a * w_abs.sum(dim=1)
    assert ((y - ref).abs() <= bound * 1.001 + 1e-6 * ref.abs().max()).all()
    assert rel_err(y, ref) < 2.0**-4


@pytest.mark.parametrize("x_mag", [1e-3, 1e3])
def test_scaled_mm_keeps_activation_and_weight_scales(x_mag):
    """Activations far from 1: casting them to FP8 unscaled (scale 1.0) underflows or saturates."""
    layer = make_layer()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4)) * x_mag
    y, ref = both_paths(layer, x)
    one = torch.tensor(1.0)
    x_unscaled = x.clamp(-448, 448).to(E4M3)
    w_t, fp32 = layer.weight.t(), torch.float32
    lost_a = torch._scaled_mm(x_unscaled, w_t, scale_a=one, scale_b=layer.weight_scale, out_dtype=fp32)
    lost_b = torch._scaled_mm(x_unscaled, w_t, scale_a=one, scale_b=one, out_dtype=fp32)
    assert rel_err(y, ref) < 2.0**-4
    assert rel_err(lost_a, ref) > 0.3 and rel_err(lost_b, ref) > 0.3
    assert not torch.allclose(y, lost_a, rtol=0.1)


@pytest.mark.parametrize("per_row", [False, True])
def test_static_input_scale_is_used_and_saturates(per_row):
    """ComfyUI's static scale: x -> (x / input_scale).clamp(+-448) in e4m3fn, scale_a = input_scale.
    A scale 4x too small saturates; the output must match that formula, not a dynamic scale."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(5))
    s = x.abs().amax().item() / 448 / 4
    layer = make_layer(per_row=per_row, input_scale=s)
    layer.matmul = "scaled_mm"
    x_hat = (x / s).clamp(-448, 448).to(E4M3).float() * s
    expected = x_hat @ layer.dequantized_weight(torch.float32).t()
    assert rel_err(layer(x), expected) < 1e-5
    layer.matmul = "dequant"
    assert rel_err(layer(x), expected) > 0.1  # the saturation is real, so the test can fail


def test_scaled_mm_shapes_dtypes_bias():
    layer = make_layer(bias=True, per_row=True)
    layer.compute_dtype = torch.bfloat16
    x = torch.randn(2, 3, 5, K, dtype=torch.bfloat16)
    y, ref = both_paths(layer, x)
    assert y.shape == ref.shape == (2, 3, 5, N) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 2.0**-4
    assert torch.equal(layer(torch.zeros(4, K)), layer.bias.expand(4, N))  # zero input: no 0/0
    assert layer(torch.zeros(0, K)).shape == (0, N)  # empty batch: no amax of nothing
    x_t = torch.randn(K, 6).t()  # a non-contiguous input
    assert rel_err(layer(x_t), layer(x_t.contiguous())) == 0


def test_scaled_mm_dims_not_multiple_of_16_use_dequant(monkeypatch):
    layer = FP8Linear.from_linear(torch.nn.Linear(40, 24))
    monkeypatch.setattr(torch, "_scaled_mm", _raising("must not be called"))
    x = torch.randn(3, 40)
    y, ref = both_paths(layer, x)
    assert torch.equal(y, ref)


def test_per_row_falls_back_when_rowwise_kernel_is_missing(monkeypatch):
    layer = make_layer(per_row=True)
    x = torch.randn(M, K)
    y_rowwise, _ = both_paths(layer, x)
    real = torch._scaled_mm

    def tensorwise_only(a, b, *, scale_a, scale_b, **kw):
        if scale_b.ndim == 2:
            raise RuntimeError("Rowwise scaling is not currently supported on your device")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", tensorwise_only)
    assert rel_err(layer(x), y_rowwise) < 1e-6
    assert layer._rowwise_failed


# --- auto mode ------------------------------------------------------------------------


def _raising(msg):
    def fail(*args, **kwargs):
        raise RuntimeError(msg)

    return fail


def test_auto_on_cpu_dequantizes(monkeypatch):
    assert not scaled_mm_supported(torch.device("cpu"))
    assert not scaled_mm_supported(torch.device("meta"))
    layer = make_layer(per_row=True)
    layer.matmul = "dequant"
    x = torch.randn(M, K)
    ref = layer(x)
    monkeypatch.setattr(torch, "_scaled_mm", _raising("auto must not call _scaled_mm on CPU"))
    layer.matmul = "auto"
    assert torch.equal(layer(x), ref)


def test_auto_falls_back_silently_when_scaled_mm_fails(monkeypatch, caplog):
    layers = torch.nn.ModuleList([make_layer(1), make_layer(2)])
    x = torch.randn(M, K)

    def run():
        return torch.cat([layer(x) for layer in layers])

    set_fp8_matmul(layers, "dequant")
    ref = run()
    calls = []

    def old_gpu(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("_scaled_mm is only supported on CUDA devices with compute capability >= 8.9")

    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", old_gpu)
    monkeypatch.setattr(fp8, "_warned_devices", set())
    set_fp8_matmul(layers, "auto")
    with caplog.at_level(logging.WARNING, logger=fp8.__name__):
        assert torch.equal(run(), ref)
        assert torch.equal(run(), ref)
    assert len(calls) == 2  # once per layer, then that layer dequantizes for good
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "_scaled_mm" not in warnings[0] and "8.9" not in warnings[0]


def test_forced_scaled_mm_failure_is_a_user_error(monkeypatch):
    layer = make_layer()
    layer.matmul = "scaled_mm"
    monkeypatch.setattr(torch, "_scaled_mm", _raising("compute capability >= 8.9"))
    with pytest.raises(Flux2KitError, match="'auto' or 'dequant'"):
        layer(torch.randn(2, K))


def test_set_fp8_matmul_and_fp8_linears():
    model = torch.nn.Sequential(make_layer(), torch.nn.Linear(N, N), torch.nn.Sequential(make_layer()))
    assert len(fp8_linears(model)) == 2
    assert set_fp8_matmul(model, "scaled_mm") == 2
    assert all(m.matmul == "scaled_mm" for m in fp8_linears(model))
    with pytest.raises(ValueError):
        set_fp8_matmul(model, "fast")


# --- loading, devices, memory --------------------------------------------------------


@pytest.mark.parametrize("bias,input_scale", [(False, False), (True, True)])
def test_meta_build_then_assign_load(bias, input_scale):
    src = make_layer(bias=bias, per_row=True, input_scale=0.01 if input_scale else None)
    sd = src.state_dict()
    expected = {"weight", "weight_scale"} | ({"input_scale"} if input_scale else set())
    assert set(sd) == expected | ({"bias"} if bias else set())
    assert not list(src.parameters())  # buffers only: ModelMixin.dtype must not see FP8

    layer = FP8Linear(K, N, bias, per_row=True, has_input_scale=input_scale, device="meta")
    assert layer.weight.is_meta and layer.weight.dtype == E4M3
    layer.load_state_dict(sd, assign=True)
    assert all(t.device.type == "cpu" for t in layer.state_dict().values())
    x = torch.randn(3, K)
    src.matmul = layer.matmul = "dequant"
    assert torch.equal(layer(x), src(x))


def test_to_moves_buffers_and_keeps_fp8():
    layer = make_layer(bias=True, per_row=True).to("meta")
    assert {t.device.type for t in layer.state_dict().values()} == {"meta"}
    assert layer.weight.dtype == E4M3 and layer.weight_scale.dtype == torch.float32


def test_weight_stays_fp8_after_forward():
    layer = make_layer(bias=True, per_row=True)
    before = {k: (t.data_ptr(), t.dtype) for k, t in layer.state_dict().items()}
    attrs = set(vars(layer))
    for mode in ("dequant", "scaled_mm", "auto"):
        layer.matmul = mode
        layer(torch.randn(4, K))
    assert {k: (t.data_ptr(), t.dtype) for k, t in layer.state_dict().items()} == before
    assert layer.weight.dtype == E4M3
    assert set(vars(layer)) == attrs  # no cached dense copy hung on the module
    assert not any(isinstance(v, torch.Tensor) for v in vars(layer).values())


def test_fast_cpu_dequantization_is_exact_for_every_e4m3_code():
    """The CPU bit-pattern path equals torch's own cast times the scale, for all 254 finite codes."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    finite = ~torch.isnan(codes.float())
    for scale in (torch.tensor(0.37), torch.tensor(3.1e-5), torch.rand(16) + 0.01):
        fast = dequantize_weight(codes, scale, torch.float32)
        s = scale.reshape(-1, 1) if scale.ndim == 1 else scale
        assert torch.equal(fast[finite], (codes.float() * s)[finite])
