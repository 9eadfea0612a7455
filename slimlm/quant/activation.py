"""Activation quantizers: integer grids for the inputs of a linear layer, computed at run time or calibrated.

Two granularities, as in ZeroQuant (Yao et al., NeurIPS 2022: "token-wise" dynamic activation
quantization) and LLM.int8() (Dettmers et al., NeurIPS 2022: the row-wise scales of its
vector-wise quantization), and the static per-tensor scheme of SmoothQuant's O1-O3 settings
(Xiao et al., ICML 2023):

- `per_token` (dynamic): each token row x_t of the (tokens, features) input gets its own range
  [min(x_t), max(x_t)], measured on every call, so an outlier token cannot spoil the others;
- `per_tensor` (static): one range for the whole tensor, the running min / max of the inputs seen
  during calibration (`observe`, or the compression engine's calibration pass); at run time values
  outside it are clipped.

Both use the integer grid of `slimlm.quant.grid` (`range_params`: the same rule as the weights):

    asymmetric: s = (max(x_max, 0) - min(x_min, 0)) / (2^b - 1),  z = round(-min(x_min, 0) / s)
    symmetric:  s = 2 max|x| / (2^b - 1),                           z = 2^(b-1)
    q = clamp(round(x / s) + z, 0, 2^b - 1),                        x^ = s (q - z)

For integer matrix multiplies the codes are shifted to signed int8, q' = q - 2^(b-1) and
z' = z - 2^(b-1), so x^ = s (q' - z') (symmetric grids have z' = 0). Bits 2 to 8 all fit int8.

Floating-point grids (`fmt` "fp8_e4m3", "fp8_e5m2" or "fp4_e2m1", always symmetric): the scale is
absmax / (largest finite value of the format), per token or from the calibrated range, and
x^ = s * fp(x / s) with the format's round-to-nearest-even (`slimlm.quant.grid.fp_encode`), as in
FP8 W8A8 inference (Micikevicius et al., 2022; per-tensor static or per-token dynamic scales).
These have only the fake-quantized path (`fake_quantize`): there is no integer code to multiply.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.quant.grid import (fake_quantize_ste, fp_decode, fp_encode, fp_max, range_params, quantize_signed,
                               signed_offset)

ACTIVATION_GRANULARITIES = ("per_token", "per_tensor")
ACTIVATION_FORMATS = {"int": None, "fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4}  # format -> its fixed bits
Granularity = Literal["per_token", "per_tensor"]


def check_activation_settings(bits: int, granularity: str, fmt: str = "int", symmetric: bool = True) -> None:
    """Raise SlimlmError unless the settings describe a supported activation grid."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise SlimlmError(f"activation bits must be an integer from 2 to 8 (got {bits!r}); "
                          "codes are multiplied as int8")
    if fmt not in ACTIVATION_FORMATS:
        raise SlimlmError(f"unknown activation format {fmt!r}; use one of {', '.join(ACTIVATION_FORMATS)}")
    if ACTIVATION_FORMATS[fmt] not in (None, bits):
        raise SlimlmError(f"{fmt} activations have {ACTIVATION_FORMATS[fmt]} bits (got bits={bits})")
    if fmt != "int" and not symmetric:
        raise SlimlmError(f"{fmt} is a symmetric grid (zero point 0); set symmetric: true")
    if granularity not in ACTIVATION_GRANULARITIES:
        raise SlimlmError(f"unknown activation granularity {granularity!r}; use per_token (dynamic, measured "
                          "per call) or per_tensor (static, calibrated)")


class ActivationQuantizer(nn.Module):
    """Quantizes a linear layer's input rows; see the module docstring for the grids.

    A per-tensor quantizer keeps the observed range in two float32 buffers (`observed_min`,
    `observed_max`, +inf / -inf until it has seen data), so a saved model reloads the same grid.
    """

    def __init__(self, bits: int = 8, granularity: Granularity = "per_token", symmetric: bool = True,
                 fmt: str = "int") -> None:
        super().__init__()
        check_activation_settings(bits, granularity, fmt, symmetric)
        self.bits, self.granularity, self.symmetric, self.fmt = bits, granularity, symmetric, fmt
        if self.static:
            self.register_buffer("observed_min", torch.tensor(float("inf")))
            self.register_buffer("observed_max", torch.tensor(float("-inf")))

    @property
    def static(self) -> bool:
        return self.granularity == "per_tensor"

    @property
    def calibrated(self) -> bool:
        return not self.static or bool(self.observed_min <= self.observed_max)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Widen the static range to hold `x` (any shape); per-token quantizers need no calibration."""
        if not self.static:
            raise SlimlmError("a per_token activation quantizer measures each call's range; only per_tensor observes")
        x = x.detach()
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise SlimlmError("calibration activations hold NaN or infinite values; check the model in float first")
        low, high = torch.aminmax(x.float())
        self.observed_min.copy_(torch.minimum(self.observed_min, low.to(self.observed_min.device)))
        self.observed_max.copy_(torch.maximum(self.observed_max, high.to(self.observed_max.device)))

    def params(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero) for a (tokens, features) input: (tokens, 1) each per token, () per tensor."""
        if self.static:
            if not self.calibrated:
                raise SlimlmError("this per_tensor activation quantizer has no calibration range: call observe(x) "
                                  "on calibration inputs, or compress with calibration data")
            return range_params(self.observed_min, self.observed_max, self.bits, self.symmetric)
        if self.symmetric:  # one pass: the symmetric range only needs |x|max
            high = rows.abs().amax(dim=1, keepdim=True).float()
            return range_params(-high, high, self.bits, True)
        # amin and amax separately: on CPU they are ten times faster than the fused aminmax over rows.
        return range_params(rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True), self.bits, False)

    def quantize(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Signed int8 codes q' of a (tokens, features) input, with scale s and signed zero z' such
        that x^ = s (q' - z')."""
        if self.fmt != "int":
            raise SlimlmError(f"{self.fmt} activations have no integer codes; use fake_quantize")
        scale, zero = self.params(rows)
        return quantize_signed(rows, scale, zero, self.bits), scale, zero - signed_offset(self.bits)

    def fake_quantize(self, x: Tensor) -> Tensor:
        """x^ in float32, for inputs of any shape (rows are the last dimension's vectors)."""
        rows = x.reshape(-1, x.shape[-1])
        if self.fmt != "int":
            return self._fake_quantize_fp(rows).reshape(x.shape)
        codes, scale, zero = self.quantize(rows)
        return ((codes.float() - zero) * scale).reshape(x.shape)

    def _fake_quantize_fp(self, rows: Tensor) -> Tensor:
        """s * fp(x / s) with s = absmax / (the format's largest value), per token or calibrated."""
        if self.static:
            if not self.calibrated:
                raise SlimlmError("this per_tensor activation quantizer has no calibration range: call observe(x) "
                                  "on calibration inputs, or compress with calibration data")
            absmax = torch.maximum(self.observed_min.abs(), self.observed_max.abs())
        else:
            absmax = rows.abs().amax(dim=1, keepdim=True).float()
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / fp_max(self.fmt)
        return fp_decode(fp_encode(rows.float() / scale, self.fmt), self.fmt) * scale

    def meta(self) -> dict:
        return {"bits": self.bits, "granularity": self.granularity, "symmetric": self.symmetric, "fmt": self.fmt}

    @classmethod
    def from_meta(cls, meta: dict) -> ActivationQuantizer:
        return cls(meta["bits"], meta["granularity"], meta["symmetric"], meta.get("fmt", "int"))

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {self.granularity}, {grid}" + ("" if self.fmt == "int" else f", {self.fmt}")


def fake_quantize_tokens(x: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Per-token dynamic fake quantization with a straight-through gradient (for training through the grid):
    the values of `ActivationQuantizer(bits, "per_token", symmetric).fake_quantize(x)`."""
    if symmetric:
        high = x.abs().amax(dim=-1, keepdim=True)
        scale, zero = range_params(-high, high, bits, True)
    else:
        scale, zero = range_params(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), bits, False)
    return fake_quantize_ste(x, scale, zero, bits)
