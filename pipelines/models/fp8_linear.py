"""FP8Linear: a linear layer whose weights stay FP8 in memory, with their scales, and two ways to run it.

``dequant``: dequantize one layer's weight into the activation dtype for one call, then
``F.linear`` (CPU, and GPUs below compute capability 8.9). ``scaled_mm``: quantize the
activations to float8_e4m3fn with a real scale and call ``torch._scaled_mm`` (FP8 tensor
cores). ``auto`` picks ``scaled_mm`` where it can run and falls back to ``dequant`` for good
the first time it fails, so a user never sees a ``_scaled_mm`` error.

What ``torch._scaled_mm`` accepts (checked on torch 2.13): the CPU build runs every
e4m3fn/e5m2 pairing, fp32/bf16/fp16 outputs, tensor-wise and row-wise scales, any shape.
CUDA (cuBLASLt) refuses e5m2 x e5m2 and needs both dims of the weight divisible by 16;
its row-wise kernel wants an e4m3fn weight and is absent from Windows builds. Activations
are always e4m3fn here, so e5m2 weights run tensor-wise; per-row scales use the row-wise
kernel when it works and otherwise a tensor-wise call with ``scale_b=1`` whose fp32 output
is multiplied by the per-row scale (the same numbers, one extra elementwise pass).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import Flux2KitError
from ..files.fp8 import check_fp8, dequantize_weight, quantize_weight

log = logging.getLogger(__name__)

MATMUL_MODES = ("auto", "dequant", "scaled_mm")
# How a loader holds weights: FP8 layers stay FP8 / are expanded to the compute dtype / bf16 linears become FP8.
WEIGHT_MODES = ("as_stored", "dequantize", "quantize")

# Activations are quantized to e4m3fn: one more mantissa bit than e5m2, and the only
# activation format every _scaled_mm backend pairs with both weight formats.
_ACT_DTYPE = torch.float8_e4m3fn
_ACT_MAX = 448.0
_MM_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned_devices: set[str] = set()
# What a missing or refusing _scaled_mm kernel raises; out-of-memory is re-raised, not hidden.
_MM_ERRORS = (RuntimeError, ValueError, NotImplementedError)


def scaled_mm_supported(device: torch.device) -> bool:
    """True only on a CUDA device of compute capability >= 8.9 with ``torch._scaled_mm``."""
    device = torch.device(device)
    # ROCm reports its own capability numbers and mostly wants the fnuz FP8 formats.
    if device.type != "cuda" or torch.version.hip or not hasattr(torch, "_scaled_mm"):
        return False
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """A Linear layer whose weight stays FP8, with its fp32 scale(s), in buffers.

    Buffers rather than Parameters: diffusers' ``ModelMixin.dtype`` reports the first
    parameter's dtype, and an FP8 weight there would make the pipeline cast inputs to FP8.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        weight_dtype=torch.float8_e4m3fn,
        per_row: bool = False,
        has_input_scale: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.matmul = "auto"
        self._scaled_mm_failed = False  # set once in auto mode; this layer then dequantizes
        self._rowwise_failed = False  # the row-wise kernel is missing on this build/device
        fp32 = dict(dtype=torch.float32, device=device)
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=check_fp8(weight_dtype), device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features if per_row else (), **fp32))
        if has_input_scale:
            self.register_buffer("input_scale", torch.ones((), **fp32))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=compute_dtype, device=device))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={self.weight.dtype}, per_row={self.weight_scale.ndim == 1}, matmul={self.matmul}"
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, per_row=False, weight_dtype=torch.float8_e4m3fn, compute_dtype=None
    ) -> "FP8Linear":
        """Quantize a float ``nn.Linear`` into an FP8Linear on the same device."""
        compute_dtype = compute_dtype or linear.weight.dtype
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            weight_dtype=weight_dtype, per_row=per_row, compute_dtype=compute_dtype,
            device=linear.weight.device,
        )
        layer.weight, layer.weight_scale = quantize_weight(linear.weight, per_row=per_row, dtype=weight_dtype)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().to(compute_dtype).clone()
        return layer

    def dequantized_weight(self, dtype=None) -> Tensor:
        """A new dense copy of the weight in ``dtype`` (default: the compute dtype)."""
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        mode = self.matmul
        if mode == "dequant" or not self._scaled_mm_shapes_ok(x):
            return self._forward_dequant(x)
        if mode == "scaled_mm":
            try:
                return self._forward_scaled_mm(x)
            except torch.cuda.OutOfMemoryError:
                raise
            except _MM_ERRORS as e:
                raise Flux2KitError(
                    f"FP8 matmul 'scaled_mm' does not run on {self.weight.device} with this torch "
                    "build. Set the FP8 matmul option to 'auto' or 'dequant'."
                ) from e
        if self._scaled_mm_failed or not scaled_mm_supported(self.weight.device):
            return self._forward_dequant(x)
        try:
            return self._forward_scaled_mm(x)
        except torch.cuda.OutOfMemoryError:
            raise
        except _MM_ERRORS as e:
            self._scaled_mm_failed = True
            if str(self.weight.device) not in _warned_devices:
                _warned_devices.add(str(self.weight.device))
                log.warning("FP8 matmul is not available on %s; FP8 weights are dequantized per "
                            "layer instead (same results, slower).", self.weight.device)
            # The kernel's own message (e.g. "... compute capability >= 8.9") is for developers.
            log.debug("torch._scaled_mm failed on %s: %s", self.weight.device, e)
            return self._forward_dequant(x)

    def _scaled_mm_shapes_ok(self, x: Tensor) -> bool:
        # cuBLASLt needs both weight dims divisible by 16; M is free (but not empty: amax).
        return (
            self.in_features % 16 == 0 and self.out_features % 16 == 0
            and x.dtype in _MM_OUT_DTYPES and x.shape[-1] == self.in_features and x.numel() > 0
        )

    def _forward_dequant(self, x: Tensor) -> Tensor:
        # The dense weight lives only for this call: memory stays at one FP8 copy per layer.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _forward_scaled_mm(self, x: Tensor) -> Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            # ComfyUI's static scale: the checkpoint says what range activations were calibrated to.
            scale_a = self.input_scale.to(torch.float32)
        else:
            # Dynamic per-tensor scale; the floor keeps an all-zero input from dividing by 0.
            scale_a = x2.abs().amax().float().clamp(min=1e-12) / _ACT_MAX
        # Divide in x's own dtype (no fp32 copy of the activations) by the scale rounded to
        # that dtype, and give _scaled_mm that same rounded scale, so x_fp8 * scale_a stays x.
        # fp16 cannot hold small scales, so it divides in fp32.
        div_dtype = torch.float32 if x2.dtype == torch.float16 else x2.dtype
        scale_a = scale_a.to(div_dtype)
        # Out-of-range values would become NaN in e4m3fn (no inf), so saturate first.
        # CUDA wants mat1 row-major; elementwise ops keep a transposed input's strides.
        x_fp8 = (x2.to(div_dtype) / scale_a).clamp(-_ACT_MAX, _ACT_MAX).to(_ACT_DTYPE).contiguous()
        scale_a = scale_a.float()
        w_t = self.weight.t()  # column-major (K, N), the layout _scaled_mm wants for mat2
        out_dtype = x.dtype
        if self.weight_scale.ndim == 0:
            out = torch._scaled_mm(
                x_fp8, w_t, scale_a=scale_a, scale_b=self.weight_scale, out_dtype=out_dtype
            )
        else:
            out = self._per_row_mm(x_fp8, w_t, scale_a, out_dtype)
        if self.bias is not None:
            # Added outside the kernel: cuBLASLt refuses a bias with fp32 output.
            out = out + self.bias.to(out_dtype)
        return out.reshape(*lead, self.out_features)

    def _per_row_mm(self, x_fp8: Tensor, w_t: Tensor, scale_a: Tensor, out_dtype: torch.dtype) -> Tensor:
        scale_b = self.weight_scale.reshape(1, -1)
        if self.weight.dtype == torch.float8_e4m3fn and not self._rowwise_failed:
            try:
                rows_a = scale_a.reshape(1, 1).expand(x_fp8.shape[0], 1).contiguous()
                return torch._scaled_mm(x_fp8, w_t, scale_a=rows_a, scale_b=scale_b, out_dtype=out_dtype)
            except torch.cuda.OutOfMemoryError:
                raise
            except _MM_ERRORS:
                self._rowwise_failed = True  # e.g. Windows builds, older torch; use the fallback
        # Tensor-wise with scale_b = 1, then the per-row (per output column) scale in fp32.
        one = torch.ones((), dtype=torch.float32, device=x_fp8.device)
        out = torch._scaled_mm(x_fp8, w_t, scale_a=scale_a, scale_b=one, out_dtype=torch.float32)
        return (out * scale_b).to(out_dtype)


def fp8_linears(module: nn.Module) -> list[FP8Linear]:
    """Every FP8Linear inside ``module`` (including itself), in module order."""
    return [m for m in module.modules() if isinstance(m, FP8Linear)]


def set_fp8_matmul(module: nn.Module, mode: str) -> int:
    """Set the matmul mode ("auto", "dequant" or "scaled_mm") on every FP8Linear; returns how many."""
    if mode not in MATMUL_MODES:
        raise ValueError(f"FP8 matmul mode must be one of {MATMUL_MODES}, not {mode!r}")
    layers = fp8_linears(module)
    for layer in layers:
        layer.matmul = mode
    return len(layers)
