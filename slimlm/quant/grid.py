"""The quantizer grid shared by every quantization method (RTN, GPTQ, AWQ, ...).

Integer grids follow the reference quantizer of GPTQ (Frantar et al., 2022; IST-DASLab `gptq`,
`quant.py`): every value is stored as an unsigned code q in [0, 2^bits - 1] and dequantizes as

    w = scale * (q - zero)

- asymmetric: xmin = min(min(w), 0), xmax = max(max(w), 0) (so 0.0 is exactly representable),
  scale = (xmax - xmin) / (2^bits - 1), zero = round(-xmin / scale); an all-zero row uses
  xmin = -1, xmax = +1 as the reference does;
- symmetric: scale = 2 * absmax / (2^bits - 1), zero = 2^(bits-1) (the GPTQ / compressed-tensors
  symmetric grid: signed codes q - 2^(bits-1) in [-2^(bits-1), 2^(bits-1) - 1]);
- clipping "mse": the reference `mse=True` search: shrink the range by p = 1 - i/100 for
  i < 80 and keep, per row, the p with the lowest sum |fake_quantize(w) - w|^2.4;
- range "signed_max" (symmetric integer grids only): llama.cpp's rule for Q4_0 / Q5_0
  (`quantize_row_q4_0_ref`): m = the value of largest magnitude (0 widened in, an all-zero row as
  [-1, 1]), scale = m / -2^(bits-1), zero = 2^(bits-1), so m itself is code 0 exactly and the
  other side reaches (2^(bits-1) - 1) / 2^(bits-1) of |m|. The scale is negative when m > 0. Against
  the balanced symmetric grid, whose step 2 absmax / (2^bits - 1) puts absmax half a step from the
  nearest level, its step is 6% finer at 4 bits and the largest weight is exact (SmolLM2-135M,
  RTN 4-bit g32, 8 WikiText-2 windows: 37.4 ppl against 42.3 balanced and 40.8 with "mse").
  Where |m| is shared by a positive and a negative value the positive one is taken (llama.cpp
  takes the first in memory order).
- range "weighted_lsq" (symmetric integer grids only): llama.cpp's importance-weighted scale search
  (`make_qx_quants` with rmse_type 1, which `quantize_row_q4_0_impl` runs per block when given an
  importance matrix): with m as for "signed_max" and nmax = 2^(bits-1), the candidate grids
  iscale = -(nmax + 0.1 k) / m, k = 0, ±1, ..., ±9, each give codes l = clamp(round(iscale w),
  -nmax, nmax - 1) and the weighted least-squares scale sum(a w l) / sum(a l^2); the candidate with
  the largest sum(a w l)^2 / sum(a l^2) (the smallest weighted squared error) wins, and its
  least-squares scale is the group's scale. Weights a: given per element (GPTQ passes llama.cpp's
  imatrix weighting, the column's mean squared activation times sqrt(sigma^2 + w^2), sigma^2 the
  row's mean squared weight), else w^2 (llama.cpp's rmse_type 1 without an importance matrix).
  Deviation: the codes are then rounded at that scale (llama.cpp keeps the winning candidate's l);
  under GPTQ the sweep chooses the codes anyway.

Floating-point grids (zero is 0, codes are the element's bit pattern):
- "fp8_e4m3" / "fp8_e5m2" (OCP FP8, Micikevicius et al., 2022): scale = absmax / max finite value,
  rounding is torch's float8 cast (round to nearest even) of w / scale;
- "fp4_e2m1" (OCP Microscaling E2M1): values {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}, scale =
  absmax / 6, round to nearest (ties to the even mantissa, as the OCP conversion rule says);
  codes are 4-bit patterns sign << 3 | magnitude index.
- "fp4_e1m2" / "fp4_e3m0" (the other 4-bit splits, searched by LLM-FP4, `slimlm.quant.llm_fp4`): the
  FP formula of that paper's reference code with the default exponent bias 2^(E-1) and subnormals,
  E1M2 {0, ±0.25, ±0.5, ..., ±1.75} (uniform: an 8-level integer grid) and E3M0 {0, ±1/8, ±1/4,
  ±1/2, ±1, ±2, ±4, ±8}; scale = absmax / 1.75 and absmax / 8, the same codes and rounding as E2M1
  (a tie goes to the even code).

Non-uniform "codebook" grids (in the spirit of SqueezeLLM, without its sensitivity weighting):
per row or per group, a table of 2^bits values fitted by 1-D k-means (Lloyd's algorithm, a fixed
number of iterations, deterministic) from two starts, the quantiles and the levels of the
asymmetric integer grid, keeping the better; codes index the table. `fit_weighted_codebook` is the
weighted 1-D k-means (sensitivity-weighted, as KVQuant's nuq datatype) on the same Lloyd iterations.

Deviations from the reference: the symmetric scale is always 2 * absmax / (2^bits - 1) (the
reference uses absmax / (2^bits - 1) for a row without negative values, which then clips its upper
half); the MSE search also applies to the FP grids (shrinking absmax); scale and zero are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError

FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "codebook")
CLIPS = ("minmax", "mse", "signed_max", "weighted_lsq")
SYMMETRIC_ONLY_CLIPS = ("signed_max", "weighted_lsq")  # llama.cpp's rules for Q4_0 / Q5_0
GRANULARITIES = ("group", "channel", "tensor")

# The GPTQ reference MSE search: grid=100, maxshrink=0.8, norm=2.4.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4

KMEANS_ITERATIONS = 25

_FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# E2M1 magnitudes, indexed by the 3 low bits of the code (exponent and mantissa bits).
FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# The 4-bit floating-point grids: magnitudes indexed by the 3 low bits of the code (exponent << M | mantissa).
FP4_MAGNITUDES = {
    "fp4_e2m1": FP4_E2M1_MAGNITUDES,
    "fp4_e1m2": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    "fp4_e3m0": (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
}
_FP4_SIGN_BIT = 8


def fp_max(fmt: str) -> float:
    """Largest finite value of a floating-point grid."""
    if fmt in _FP8_DTYPES:
        return float(torch.finfo(_FP8_DTYPES[fmt]).max)
    if fmt in FP4_MAGNITUDES:
        return FP4_MAGNITUDES[fmt][-1]
    raise SlimlmError(f"'{fmt}' is not a floating-point grid; use one of fp8_e4m3, fp8_e5m2, {', '.join(FP4_MAGNITUDES)}")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def check_format(bits: int, fmt: str) -> None:
    """Raise SlimlmError unless `bits` is valid for `fmt`."""
    if fmt not in FORMATS:
        raise SlimlmError(f"unknown quantization format '{fmt}'; use one of {', '.join(FORMATS)}")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise SlimlmError(f"bits must be an integer (got {bits!r})")
    if fmt in _FP8_DTYPES and bits != 8:
        raise SlimlmError(f"{fmt} stores 8 bits per weight (got bits={bits}); set bits: 8")
    if fmt in FP4_MAGNITUDES and bits != 4:
        raise SlimlmError(f"{fmt} stores 4 bits per weight (got bits={bits}); set bits: 4")
    if fmt in ("int", "codebook") and not 2 <= bits <= 8:
        raise SlimlmError(f"{fmt} quantization supports 2 to 8 bits (got bits={bits}); choose bits in 2..8")


def _check_clip(clip: str) -> None:
    if clip not in CLIPS:
        raise SlimlmError(f"unknown clipping '{clip}'; use one of {', '.join(CLIPS)}")


def _check_matrix(w: Tensor) -> None:
    if w.dim() != 2 or w.numel() == 0:
        raise SlimlmError(f"expected a non-empty (rows, columns) weight matrix, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise SlimlmError(f"expected a floating-point weight, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise SlimlmError("the weight holds NaN or infinite values; check the checkpoint before quantizing it")


def group_bounds(in_features: int, group_size: int | None) -> list[tuple[int, int]]:
    """Column ranges [start, end) of the groups; None is one group (per channel).

    A group size that does not divide in_features gives a shorter last group (576 with 128:
    four groups of 128 and one of 64).
    """
    if in_features < 1:
        raise SlimlmError(f"in_features must be at least 1 (got {in_features})")
    if group_size is None:
        return [(0, in_features)]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise SlimlmError(f"group_size must be a positive integer or None for per-channel (got {group_size!r})")
    return [(start, min(start + group_size, in_features)) for start in range(0, in_features, group_size)]


def group_minmax(w: Tensor, group_size: int | None) -> tuple[Tensor, Tensor]:
    """(out, n_groups) min and max of each group of `group_size` columns of an (out, in) weight (autograd-safe)."""
    bounds = group_bounds(w.shape[1], group_size)
    if len({end - start for start, end in bounds}) == 1:  # equal groups: one reshape
        grouped = w.reshape(w.shape[0], len(bounds), -1)
        return grouped.amin(dim=2), grouped.amax(dim=2)
    return (torch.stack([w[:, a:b].amin(dim=1) for a, b in bounds], dim=1),
            torch.stack([w[:, a:b].amax(dim=1) for a, b in bounds], dim=1))


def column_groups(in_features: int, group_size: int | None, g_idx: Tensor | None = None) -> Tensor:
    """(in_features,) int64 group index of every input column (g_idx when act-order stored one)."""
    if g_idx is not None:
        return g_idx.long()
    if group_size is None:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


# ----------------------------------------------------------------------------------------------
# Integer grid
# ----------------------------------------------------------------------------------------------


def _max_code(bits: int) -> int:
    return 2**bits - 1


def _as_rows(t: Tensor | float, like: Tensor) -> Tensor | float:
    """Broadcast per-row parameters (rows,) against a (rows, cols) tensor."""
    if isinstance(t, Tensor) and like.dim() == 2 and t.dim() == 1:
        return t.unsqueeze(1)
    return t


def _range_to_params(xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    scale = (xmax - xmin) / _max_code(bits)
    if symmetric:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _minmax_range(w: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    return widen_range(w.min(dim=1).values, w.max(dim=1).values, symmetric)


def widen_range(xmin: Tensor, xmax: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """The clipping range of observed minima / maxima (any shape): widened to hold 0, centred when
    symmetric, an all-zero range widened to [-1, 1] (the reference quantizer's rules)."""
    zeros = torch.zeros_like(xmin)
    xmin = torch.minimum(xmin, zeros)
    xmax = torch.maximum(xmax, zeros)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    # An all-zero row would give scale 0; the reference widens it to [-1, 1].
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    return xmin, xmax


def range_params(xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Integer-grid scale and zero (float, integer-valued) for observed ranges of any shape: the
    min-max rule of `find_params` applied to ranges gathered elsewhere (per token at run time, or
    over a calibration set: `slimlm.quant.activation`)."""
    check_format(bits, "int")
    xmin, xmax = widen_range(xmin.float(), xmax.float(), symmetric)
    return _range_to_params(xmin, xmax, bits, symmetric)


def _lp_error(w: Tensor, approx: Tensor) -> Tensor:
    """Per-row sum |approx - w|^2.4, the criterion of the reference MSE search."""
    return (approx - w).abs_().pow_(MSE_NORM).sum(dim=1)


def find_params(w: Tensor, bits: int, symmetric: bool, clip: str = "minmax",
                weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Integer-grid scale (rows,) and zero (rows,) for a (rows, cols) slice: one group per row.

    zero is a float tensor holding integers in [0, 2^bits - 1]. `weights` (like w): the per-element
    importance of the "weighted_lsq" search (else w^2).
    """
    check_format(bits, "int")
    _check_clip(clip)
    _check_matrix(w)
    w = w.float()
    if clip == "signed_max":
        return _signed_max_params(w, bits, symmetric)
    if clip == "weighted_lsq":
        return _weighted_lsq_params(w, bits, symmetric, weights)
    xmin, xmax = _minmax_range(w, symmetric)
    scale, zero = _range_to_params(xmin, xmax, bits, symmetric)
    if clip == "mse":
        scale, zero = _mse_search_int(w, xmin, xmax, bits, symmetric, scale, zero)
    return scale, zero


def _signed_max_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """llama.cpp's Q4_0 / Q5_0 range rule; see the module docstring."""
    peak = _signed_peak(w, symmetric, "signed_max")
    scale = peak / -float(2 ** (bits - 1))
    return scale, torch.full_like(scale, float(2 ** (bits - 1)))


def _signed_peak(w: Tensor, symmetric: bool, clip: str) -> Tensor:
    """Per row, the value of largest magnitude (0 widened in; the positive one on a tie)."""
    if not symmetric:
        raise SlimlmError(f'the "{clip}" range rule is for symmetric grids: set symmetric: true')
    low, high = widen_range(w.min(dim=1).values, w.max(dim=1).values, symmetric=False)
    return torch.where(-low > high, low, high)


def _weighted_lsq_params(w: Tensor, bits: int, symmetric: bool, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """llama.cpp's `make_qx_quants` (rmse_type 1) per row; see the module docstring."""
    peak = _signed_peak(w, symmetric, "weighted_lsq")
    nmax = float(2 ** (bits - 1))
    a = w * w if weights is None else weights.float()
    if a.shape != w.shape:
        raise SlimlmError(f"weighted_lsq weights have shape {tuple(a.shape)}, the weights {tuple(w.shape)}")

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor]:
        levels = torch.clamp(torch.round(iscale[:, None] * w), -nmax, nmax - 1)
        return (a * w * levels).sum(dim=1), (a * levels * levels).sum(dim=1)

    iscale = -nmax / peak
    sumlx, suml2 = fit(iscale)
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp_min(1e-30), 1 / iscale)
    best = scale * sumlx
    for step in [k for k in range(-9, 10) if k]:
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        candidate = sumlx / suml2.clamp_min(1e-30)
        scale = torch.where(better, candidate, scale)
        best = torch.where(better, candidate * sumlx, best)
    scale = torch.where(scale == 0, 1 / iscale, scale)  # an all-zero row of weights a: the signed-max grid
    return scale, torch.full_like(scale, nmax)


def _mse_search_int(
    w: Tensor, xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool, scale: Tensor, zero: Tensor
) -> tuple[Tensor, Tensor]:
    best = torch.full_like(scale, math.inf)
    scale, zero = scale.clone(), zero.clone()
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        shrink = 1 - i / MSE_GRID
        scale_p, zero_p = _range_to_params(shrink * xmin, shrink * xmax, bits, symmetric)
        error = _lp_error(w, fake_quantize(w, scale_p, zero_p, bits))
        better = error < best  # strict: p = 1 (min-max) wins ties, so MSE is never worse
        best = torch.where(better, error, best)
        scale = torch.where(better, scale_p, scale)
        zero = torch.where(better, zero_p, zero)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """uint8 codes clamp(round(w / scale) + zero, 0, 2^bits - 1); (rows,) parameters broadcast as (rows, 1)."""
    scale, zero = _as_rows(scale, w), _as_rows(zero, w)
    q = torch.clamp(torch.round(w.float() / scale) + zero, 0, _max_code(bits))
    return q.to(torch.uint8)


def signed_offset(bits: int) -> int:
    """2^(bits-1): subtracted from unsigned codes [0, 2^bits - 1] it gives signed codes that fit int8."""
    return 2 ** (bits - 1)


def quantize_signed(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """int8 codes quantize(x, scale, zero, bits) - 2^(bits-1), in one pass for matmul kernels.

    scale and zero broadcast against x as they are (no per-row reshaping). Shifting the integer
    zero point before rounding gives exactly the same integers: round(v) + z - o = round(v) + (z - o).
    """
    offset = signed_offset(bits)
    q = x.float() / scale
    q = q.round_().add_(zero - offset).clamp_(-offset, _max_code(bits) - offset)
    return q.to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | float) -> Tensor:
    """float32 scale * (q - zero); (rows,) parameters broadcast as (rows, 1)."""
    scale, zero = _as_rows(scale, q), _as_rows(zero, q)
    return (q.float() - zero) * scale


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """dequantize(quantize(w)) without the uint8 round trip (same values), in w's dtype."""
    scale, zero = _as_rows(scale, w), _as_rows(zero, w)
    q = torch.clamp(torch.round(w.float() / scale) + zero, 0, _max_code(bits))
    return ((q - zero) * scale).to(w.dtype)


def round_ste(x: Tensor) -> Tensor:
    """round(x) with a straight-through gradient (the identity's): for learned quantization parameters."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """`fake_quantize` (same values; scale and zero broadcast against w as they are) that autograd can
    differentiate as scale * (clamp(round_ste(w / scale) + zero, 0, 2^bits - 1) - zero) with `round_ste`:
    the gradient reaches w (1 inside the grid's range, 0 where the clamp binds) and the scale; the zero
    point, an integer, takes none. One fused autograd function: a third fewer full-size operations
    than the composite expression, which matters for methods that train through it (OmniQuant)."""
    return _FakeQuantizeSTE.apply(w, scale, zero, bits)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to `shape`."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    return grad.sum(dim=dims, keepdim=True).reshape(shape)


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
        t = w / scale
        shifted = torch.round(t).add_(zero)
        codes = shifted.clamp(0, _max_code(bits))
        inside = codes == shifted
        centred = codes.sub_(zero)  # q - zero
        ctx.save_for_backward(t, centred, inside)
        ctx.scale_shape = scale.shape
        return centred * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        t, centred, inside = ctx.saved_tensors
        grad_w = torch.where(inside, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:  # d/dscale of scale * (t + (round(t) - t).detach()) inside, scale * (q - z) outside
            grad_scale = _sum_to(grad * torch.where(inside, centred - t, centred), ctx.scale_shape)
        return grad_w, grad_scale, None, None


def fake_quantize_groups(w: Tensor, bits: int, group_size: int | None, symmetric: bool) -> Tensor:
    """Min-max round-to-nearest of a whole (out, in) weight, dequantized: the same values as
    quantize_weight(w, ...).dequantize() for the integer grid, vectorised over groups (AWQ's searches
    call it many times, on weights derived from checked ones: no finiteness check here)."""
    rows, columns = w.shape
    size = columns if group_size is None else min(group_size, columns)
    full = columns - columns % size

    def per_group(part: Tensor, width: int) -> Tensor:
        return fake_quantize_rows(part.reshape(-1, width), bits, symmetric).reshape(part.shape)

    pieces = [per_group(w[:, :full], size)]
    if full < columns:  # the shorter last group
        pieces.append(per_group(w[:, full:], columns - full))
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def fake_quantize_rows(w: Tensor, bits: int, symmetric: bool) -> Tensor:
    """`fake_quantize(w, *find_params(w, bits, symmetric), bits)` for a (rows, cols) float tensor, one
    min-max group per row, in float32: the same values, in fewer passes and without the input checks (for
    search loops that quantize thousands of candidates)."""
    w = w.float()
    low, high = torch.aminmax(w, dim=1)
    scale, zero = _range_to_params(*widen_range(low, high, symmetric), bits, symmetric)
    scale, zero = scale[:, None], zero[:, None]
    q = torch.div(w, scale).round_().add_(zero).clamp_(0, _max_code(bits))
    return q.sub_(zero).mul_(scale)


# ----------------------------------------------------------------------------------------------
# Floating-point grids
# ----------------------------------------------------------------------------------------------


def _fp_scale(absmax: Tensor, fmt: str) -> Tensor:
    absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)  # all-zero rows: any scale works
    return absmax / fp_max(fmt)


def _fp4_encode(x: Tensor, fmt: str = "fp4_e2m1") -> Tensor:
    magnitudes = torch.tensor(FP4_MAGNITUDES[fmt], device=x.device)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    a = x.abs().clamp(max=FP4_MAGNITUDES[fmt][-1])
    index = torch.bucketize(a, midpoints)  # a tie at a midpoint goes to the lower magnitude...
    tie = a == midpoints[index.clamp(max=len(midpoints) - 1)]
    index = torch.where(tie & (index % 2 == 1), index + 1, index)  # ...unless that one's code (mantissa) is odd
    sign = (x < 0) & (index > 0)
    return (index + sign.long() * _FP4_SIGN_BIT).to(torch.uint8)


def _fp4_decode(codes: Tensor, fmt: str = "fp4_e2m1") -> Tensor:
    magnitudes = FP4_MAGNITUDES[fmt]
    values = torch.tensor(magnitudes + tuple(-m for m in magnitudes), device=codes.device)
    return values[codes.long()]


def fp_encode(x: Tensor, fmt: str) -> Tensor:
    """uint8 codes (bit patterns) of x, already divided by its scale."""
    x = x.float().clamp(-fp_max(fmt), fp_max(fmt))
    if fmt in FP4_MAGNITUDES:
        return _fp4_encode(x, fmt)
    return x.to(_FP8_DTYPES[fmt]).view(torch.uint8)


def fp_decode(codes: Tensor, fmt: str) -> Tensor:
    """float32 values of FP codes (before scaling)."""
    if fmt in FP4_MAGNITUDES:
        return _fp4_decode(codes, fmt)
    return codes.view(_FP8_DTYPES[fmt]).float()


def find_fp_scale(w: Tensor, fmt: str, clip: str = "minmax") -> Tensor:
    """Per-row scale (rows,) of an FP grid: absmax / max finite value (shrunk by the MSE search)."""
    _check_clip(clip)
    _check_matrix(w)
    w = w.float()
    absmax = w.abs().amax(dim=1)
    scale = _fp_scale(absmax, fmt)
    if clip == "mse":
        best = torch.full_like(scale, math.inf)
        candidate_scale = scale
        for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
            candidate = _fp_scale(absmax * (1 - i / MSE_GRID), fmt)
            approx = fp_decode(fp_encode(w / candidate[:, None], fmt), fmt) * candidate[:, None]
            error = _lp_error(w, approx)
            better = error < best
            best = torch.where(better, error, best)
            candidate_scale = torch.where(better, candidate, candidate_scale)
        scale = candidate_scale
    return scale


# ----------------------------------------------------------------------------------------------
# Codebook (non-uniform) grid
# ----------------------------------------------------------------------------------------------


def _nearest_entry(values: Tensor, table: Tensor) -> Tensor:
    """Index of the nearest entry of each row's sorted table (rows, k) for values (rows, n)."""
    midpoints = (table[:, 1:] + table[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def _lloyd(w: Tensor, table: Tensor, iterations: int, weights: Tensor | None = None) -> Tensor:
    """Lloyd's iterations from a sorted (rows, k) table; never increases the (weighted) squared error.
    `weights` (rows, n), non-negative, weight each value's squared error (weighted k-means)."""
    rows, entries = table.shape
    weights = torch.ones_like(w) if weights is None else weights
    for _ in range(iterations):
        index = _nearest_entry(w, table)
        sums = torch.zeros(rows, entries, device=w.device).scatter_add_(1, index, w * weights)
        counts = torch.zeros(rows, entries, device=w.device).scatter_add_(1, index, weights)
        # An empty cluster keeps its entry; sorting keeps the midpoints of the next step valid.
        filled = counts > 0  # (weighted counts may be below 1: divide by the count itself)
        means = sums / torch.where(filled, counts, torch.ones_like(counts))
        table = torch.where(filled, means, table).sort(dim=1).values
    return table


def _squared_error(w: Tensor, table: Tensor) -> Tensor:
    return (table.gather(1, _nearest_entry(w, table)) - w).pow(2).sum(dim=1)


def fit_codebook(w: Tensor, bits: int, iterations: int = KMEANS_ITERATIONS) -> tuple[Tensor, Tensor]:
    """1-D k-means per row of (rows, n): sorted tables (rows, 2^bits) and uint8 codes (rows, n).

    Two deterministic starts, keeping the better per row: the quantiles (i + 0.5) / k (dense where
    the weights are) and the levels of the asymmetric min-max integer grid of the same bits. From
    the quantiles alone Lloyd often stops in a worse optimum than the uniform grid on Gaussian
    weights (the tails share one entry); the grid start makes the codebook never worse than it.
    """
    w = w.float()
    entries = 2**bits
    n = w.shape[1]
    ordered = w.sort(dim=1).values
    positions = ((torch.arange(entries, dtype=torch.float64) + 0.5) / entries * n).long().clamp(max=n - 1)
    from_quantiles = _lloyd(w, ordered[:, positions.to(w.device)], iterations)
    scale, zero = find_params(w, bits, symmetric=False)
    levels = (torch.arange(entries, device=w.device, dtype=torch.float32)[None, :] - zero[:, None]) * scale[:, None]
    from_grid = _lloyd(w, levels, iterations)
    use_grid = _squared_error(w, from_grid) < _squared_error(w, from_quantiles)
    table = torch.where(use_grid[:, None], from_grid, from_quantiles)
    return table, _nearest_entry(w, table).to(torch.uint8)


def fit_weighted_codebook(values: Tensor, weights: Tensor, bits: int,
                          iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """Weighted 1-D k-means of a 1-D set of `values` with non-negative `weights` (sensitivity-weighted
    k-means, as SqueezeLLM and KVQuant fit non-uniform datatypes): a sorted table of 2^bits entries
    minimising sum weights * (value - nearest entry)^2. Two deterministic starts, keeping the better:
    the weighted quantiles (i + 0.5) / k and 2^bits evenly spaced levels over [min, max]. All-zero
    weights fall back to equal weights."""
    check_format(bits, "codebook")
    values, weights = values.float().reshape(1, -1), weights.float().reshape(1, -1).clamp_min(0)
    if values.numel() == 0:
        raise SlimlmError("a codebook needs at least one value")
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(values)
    entries = 2**bits
    order = values.argsort(dim=1)
    ordered, cumulative = values.gather(1, order), weights.gather(1, order).cumsum(dim=1)
    targets = (torch.arange(entries, dtype=torch.float32, device=values.device) + 0.5) / entries * cumulative[0, -1]
    positions = torch.searchsorted(cumulative[0].contiguous(), targets).clamp(max=values.shape[1] - 1)
    starts = [ordered[:, positions],
              torch.linspace(float(values.min()), float(values.max()), entries, device=values.device)[None]]
    best, best_error = None, math.inf
    for start in starts:
        table = _lloyd(values, start.sort(dim=1).values, iterations, weights)
        error = float(((table.gather(1, _nearest_entry(values, table)) - values).pow(2) * weights).sum())
        if error < best_error:
            best, best_error = table, error
    return best[0]


# ----------------------------------------------------------------------------------------------
# Whole-weight quantization
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """A quantized (out, in) weight: codes and the parameters needed to dequantize it.

    scale and zero are (out, n_groups) float32; zero is 0 for FP grids and codebooks, scale is 1 for
    codebooks. g_idx (in,) int32 maps each input column to its group when act-order reordered the
    groups (None when column j is in group j // group_size). codebook is (out, n_groups, 2^bits).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int | None
    symmetric: bool
    fmt: str = "int"
    g_idx: Tensor | None = None
    codebook: Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    def dequantize(self) -> Tensor:
        """(out, in) float32 weight."""
        return dequantize_codes(
            self.codes, self.scale, self.zero, self.bits, self.fmt, self.group_size, self.g_idx, self.codebook
        )


def _per_column(params: Tensor, in_features: int, group_size: int | None, g_idx: Tensor | None) -> Tensor:
    """(out, n_groups) parameters expanded to (out, in)."""
    return params[:, column_groups(in_features, group_size, g_idx).to(params.device)]


def _equal_groups(in_features: int, group_size: int | None, g_idx: Tensor | None) -> bool:
    return g_idx is None and (group_size is None or in_features % group_size == 0)


def dequantize_codes(
    codes: Tensor,
    scale: Tensor | None,
    zero: Tensor | float,
    bits: int,
    fmt: str,
    group_size: int | None,
    g_idx: Tensor | None = None,
    codebook: Tensor | None = None,
) -> Tensor:
    """(out, in) float32 weight from uint8 codes; the one dequantization every path uses.

    scale/zero are (out, n_groups) (zero may be a number, e.g. 2^(bits-1) of a symmetric grid);
    scale may be None for codebooks.
    """
    out_features, in_features = codes.shape
    if fmt == "codebook":
        groups = column_groups(in_features, group_size, g_idx).to(codes.device)
        entries = codebook.shape[2]
        flat_index = groups[None, :] * entries + codes.long()
        return codebook.float().reshape(out_features, -1).gather(1, flat_index)
    if fmt == "int":
        w = codes.float()
        if isinstance(zero, Tensor):
            zero = zero.float()
    else:
        w = fp_decode(codes, fmt)
        zero = 0.0
    scale = scale.float()
    if _equal_groups(in_features, group_size, g_idx):
        # (out, n_groups, group) view: broadcasting is much cheaper than gathering per column.
        grouped = w.view(out_features, scale.shape[1], -1)
        if isinstance(zero, Tensor):
            grouped.sub_(zero[..., None])
        elif zero != 0:
            grouped.sub_(zero)
        grouped.mul_(scale[..., None])
        return w
    if isinstance(zero, Tensor):
        w.sub_(_per_column(zero, in_features, group_size, g_idx))
    elif zero != 0:
        w.sub_(zero)
    return w.mul_(_per_column(scale, in_features, group_size, g_idx))


def _check_granularity(granularity: str, group_size: int | None) -> None:
    if granularity not in GRANULARITIES:
        raise SlimlmError(f"unknown granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}")
    if granularity != "group" and group_size is not None:
        raise SlimlmError(
            f"granularity '{granularity}' has no groups but group_size={group_size} was given; "
            "set group_size to None, or use granularity 'group'"
        )


def _slices(w: Tensor, bounds: list[tuple[int, int]]) -> list[tuple[list[int], Tensor]]:
    """Groups of equal width stacked as (rows * n, width) so one call handles them all."""
    by_width: dict[int, list[int]] = {}
    for index, (start, end) in enumerate(bounds):
        by_width.setdefault(end - start, []).append(index)
    stacked = []
    for width, indices in by_width.items():
        parts = [w[:, bounds[i][0] : bounds[i][1]] for i in indices]
        # (rows, n, width) -> (n * rows, width) group-major: row r of group i is at i * rows + r.
        stacked.append((indices, torch.stack(parts, dim=0).reshape(-1, width)))
    return stacked


def _per_slice(
    w: Tensor, bounds: list[tuple[int, int]], fit: Callable[[Tensor], tuple[Tensor, ...]]
) -> list[Tensor]:
    """Apply fit ((n, width) -> tensors with n leading rows) to every group: (out, n_groups, ...) results."""
    rows = w.shape[0]
    results: list[Tensor] | None = None
    for indices, stacked in _slices(w, bounds):
        outputs = fit(stacked)
        if results is None:
            results = [torch.empty((rows, len(bounds), *o.shape[1:]), dtype=o.dtype, device=o.device) for o in outputs]
        for result, output in zip(results, outputs):
            result[:, indices] = output.reshape(len(indices), rows, *output.shape[1:]).transpose(0, 1)
    return results


def quantize_weight(
    w: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip: str = "minmax",
    granularity: str = "group",
    fmt: str = "int",
) -> QuantizedWeight:
    """Round-to-nearest of a whole (out, in) weight.

    granularity "group" uses group_size (None: one group per row, i.e. per channel); "channel" is
    one group per row; "tensor" is one scale for the whole matrix, stored broadcast per row.
    """
    check_format(bits, fmt)
    _check_clip(clip)
    _check_matrix(w)
    _check_granularity(granularity, group_size)
    if fmt.startswith("fp") and not symmetric:
        raise SlimlmError(f"{fmt} is a symmetric grid (zero point 0); set symmetric: true")
    if fmt == "codebook" and clip != "minmax":
        raise SlimlmError(
            "clipping does not apply to codebooks (k-means already minimises the error); use clip: minmax"
        )
    if fmt != "int" and clip in SYMMETRIC_ONLY_CLIPS:
        raise SlimlmError(f'the "{clip}" range rule is for integer grids, not {fmt}; use clip: minmax or mse')
    w = w.detach().float()
    rows, columns = w.shape
    bounds = group_bounds(columns, group_size)
    source = w.reshape(1, -1) if granularity == "tensor" else w
    source_bounds = [(0, source.shape[1])] if granularity == "tensor" else bounds
    params = _fit_params(source, source_bounds, bits, symmetric, clip, fmt)
    if granularity == "tensor":
        params = [p.expand(rows, *p.shape[1:]).contiguous() for p in params]
    return _encode(w, bounds, params, bits, group_size, symmetric, fmt)


def quantize_weight_range(w: Tensor, xmin: Tensor, xmax: Tensor, bits: int, group_size: int | None,
                          symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest of an (out, in) weight on the integer grid of given (out, n_groups) clipping ranges
    (learned elsewhere, e.g. OmniQuant's LWC): scale and zero by `range_params`, codes by `quantize`."""
    check_format(bits, "int")
    _check_matrix(w)
    w = w.detach().float()
    bounds = group_bounds(w.shape[1], group_size)
    if xmin.shape != (w.shape[0], len(bounds)) or xmax.shape != xmin.shape:
        raise SlimlmError(f"clipping ranges must have shape {(w.shape[0], len(bounds))} "
                          f"(got {tuple(xmin.shape)} and {tuple(xmax.shape)})")
    params = list(range_params(xmin.detach(), xmax.detach(), bits, symmetric))
    return _encode(w, bounds, params, bits, group_size, symmetric, "int")


def _fit_params(
    w: Tensor, bounds: list[tuple[int, int]], bits: int, symmetric: bool, clip: str, fmt: str
) -> list[Tensor]:
    if fmt == "int":
        return _per_slice(w, bounds, lambda s: find_params(s, bits, symmetric, clip))
    if fmt == "codebook":
        return _per_slice(w, bounds, lambda s: (fit_codebook(s, bits)[0],))
    return _per_slice(w, bounds, lambda s: (find_fp_scale(s, fmt, clip),))


def _encode(
    w: Tensor,
    bounds: list[tuple[int, int]],
    params: list[Tensor],
    bits: int,
    group_size: int | None,
    symmetric: bool,
    fmt: str,
) -> QuantizedWeight:
    rows, columns = w.shape
    codes = torch.empty(rows, columns, dtype=torch.uint8, device=w.device)
    ones = torch.ones(rows, len(bounds), device=w.device)
    codebook = None
    if fmt == "int":
        scale, zero = params
    elif fmt == "codebook":
        (codebook,) = params
        scale, zero = ones, torch.zeros_like(ones)
    else:
        (scale,) = params
        zero = torch.zeros_like(ones)
    for group, (start, end) in enumerate(bounds):
        block = w[:, start:end]
        if fmt == "int":
            codes[:, start:end] = quantize(block, scale[:, group], zero[:, group], bits)
        elif fmt == "codebook":
            codes[:, start:end] = _nearest_entry(block, codebook[:, group]).to(torch.uint8)
        else:
            codes[:, start:end] = fp_encode(block / scale[:, group, None], fmt)
    return QuantizedWeight(
        codes=codes, scale=scale, zero=zero, bits=bits, group_size=group_size,
        symmetric=symmetric if fmt == "int" else fmt != "codebook", fmt=fmt, codebook=codebook,
    )


# The grid during a left-to-right OBS sweep (GPTQ; SparseGPT's joint sparsify-and-quantize mode).

class SweepGrid:
    """Scale and zero point of each column during a left-to-right OBS sweep (GPTQ; SparseGPT's joint mode).

    Group-wise: a group's parameters are computed when the sweep reaches the group's first column,
    from the weights as updated so far; per-channel, per-tensor and `static_groups`: computed up
    front from the unquantized weights in the original column order. Records each column's group
    (g_idx) and assembles the QuantizedWeight at the end.
    """

    def __init__(self, W: torch.Tensor, perm: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                 clip: str = "minmax", static_groups: bool = False, per_tensor: bool = False,
                 importance: torch.Tensor | None = None):
        """`importance` (columns,): the mean squared input of each column (GPTQ: the Hessian's diagonal),
        for the "weighted_lsq" search: element weights importance * sqrt(sigma^2 + w^2) as llama.cpp's."""
        rows, columns = W.shape
        self.bits, self.group_size, self.symmetric, self.clip = bits, group_size, symmetric, clip
        self._importance, self._sigma2 = None, None
        if clip == "weighted_lsq" and importance is not None:
            self._importance = importance.float().to(W.device)
            self._sigma2 = W.float().pow(2).mean(dim=1, keepdim=True)
        self.bounds = group_bounds(columns, group_size)
        self.group_of_column = _group_lookup(self.bounds, columns)
        self.order = perm.tolist()
        self.static = None
        if per_tensor:
            self.static = [_tensor_params(W, bits, symmetric, clip)] * len(self.bounds)
        elif group_size is None or static_groups:
            self.static = [find_params(W[:, start:end], bits, symmetric, clip,
                                       self._weights(W[:, start:end], list(range(start, end))))
                           for start, end in self.bounds]
        self.params: dict[int, tuple[torch.Tensor, torch.Tensor]] = dict(enumerate(self.static)) if self.static else {}
        self.group_index = torch.zeros(columns, dtype=torch.int32)  # per position in processing order
        self._current: tuple[torch.Tensor, torch.Tensor] | None = None

    def _weights(self, values: torch.Tensor, columns: list[int]) -> torch.Tensor | None:
        """llama.cpp's element weights for the weighted_lsq search of these (original) columns, or None."""
        if self._importance is None:
            return None
        importance = self._importance[torch.tensor(columns, device=self._importance.device)]
        return importance[None, :] * torch.sqrt(self._sigma2 + values.float().pow(2))

    def at(self, position: int, W1: torch.Tensor, i: int, W: torch.Tensor, block_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) for the column at `position` of the (permuted) sweep; W1 is the current lazy
        block, column-major, with this column at row i; W the full (permuted) matrix."""
        if self.static is not None:
            group = self.group_of_column[self.order[position]]
            self._current = self.static[group]
        else:
            group = self.group_of_column[position]
            if position == self.bounds[group][0]:
                width = self.bounds[group][1] - position
                # The group's weights as updated so far: in-block part from W1, the rest from W.
                current = torch.cat([W1[i:].T, W[:, block_end:]], dim=1)[:, :width]
                weights = self._weights(current, self.order[position:position + width])
                self.params[group] = find_params(current, self.bits, self.symmetric, self.clip, weights)
            self._current = self.params[group]
        self.group_index[position] = group
        return self._current

    def quantized(self, codes_t: torch.Tensor, perm: torch.Tensor) -> QuantizedWeight:
        """The QuantizedWeight from the codes in processing order, (columns, rows)."""
        groups = range(len(self.bounds))
        scales = torch.stack([self.params[g][0] for g in groups], dim=1)
        zeros = torch.stack([self.params[g][1] for g in groups], dim=1)
        inverse = torch.argsort(perm)
        codes = codes_t.T[:, inverse].contiguous()
        g_idx = self.group_index[inverse.cpu()]
        trivial = torch.equal(g_idx, torch.tensor(self.group_of_column, dtype=torch.int32))
        return QuantizedWeight(
            codes=codes, scale=scales, zero=zeros, bits=self.bits, group_size=self.group_size,
            symmetric=self.symmetric, fmt="int", g_idx=None if trivial else g_idx.to(codes.device), codebook=None,
        )


def _group_lookup(bounds: list[tuple[int, int]], columns: int) -> list[int]:
    lookup = [0] * columns
    for group, (start, end) in enumerate(bounds):
        lookup[start:end] = [group] * (end - start)
    return lookup


def _tensor_params(W: torch.Tensor, bits: int, symmetric: bool, clip: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale and zero point for the whole matrix, broadcast to every row."""
    scale, zero = find_params(W.reshape(1, -1), bits, symmetric, clip)
    return scale.expand(W.shape[0]).clone(), zero.expand(W.shape[0]).clone()
