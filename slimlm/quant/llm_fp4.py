"""LLM-FP4 (Liu et al., EMNLP 2023, arXiv:2310.16836): 4-bit floating-point weights and activations.

Two parts, both found per linear layer on calibration inputs, block by block in the engine's sequential
pass (the inputs already carry the earlier blocks' quantization):

1. Joint format and maximum-value search (Sec. 4.1). A 4-bit FP value has 1 sign bit and E exponent,
   M mantissa bits with E + M = 3 (E1M2, E2M1, E3M0: `slimlm.quant.grid` "fp4_e1m2", "fp4_e2m1",
   "fp4_e3m0"); its exponent bias fixes the largest value, so choosing the bias is choosing the
   clipping maximum. For each format the maximum is searched on a grid of `max_grid` candidates
   evenly spaced in [min_fraction, 1] x absmax, per output channel for the weights and per tensor for
   the activations, minimising the squared error of the layer's output against the float layer
   (the reference's "L2_norm" metric) on a subsample of `search_tokens` calibration tokens:

       min || X W^T - Q_a(X) Q_w(W)^T ||^2

   Each round (`search_rounds`, the reference's `--search_round`): the weight maximum of every
   weight format given the current activation grid, the weight format with the lowest error, then
   the activation maximum of every activation format given the chosen weights, and the best
   activation format. The grid holds absmax itself (fraction 1) and a candidate replaces the
   incumbent only when strictly better, so the searched grid is never worse than the min-max one on
   the search tokens.

2. Pre-shifted exponent bias (Sec. 4.2). Activations vary much more across channels than within one,
   so each input channel j gets its own real-valued exponent bias from its calibration max |X_j|,
   b_j = log2(fp_max) - log2(max|X_j|) (the reference's 2^E - log2(max) + log2(2 - 2^-M) - 1 up to an
   integer), split into the tensor-wise real-valued bias t = log2(fp_max) - log2(A) of the searched
   tensor maximum A and an integer per-channel part r_j = clamp(round(b_j) - round(t), 0, 2^E - 1)
   (the reference's clamp; `max_shift` overrides 2^E - 1). b_j and t are rounded separately, as in the
   reference code, so a lifted channel's maximum lands within a factor 2 of A (the search over A also
   moves that rounding). With rho_j = -r_j, channel j's grid is the tensor grid times 2^rho_j, and
   2^rho_j is re-parameterised into the weight's columns:

       y = Q_a(X / 2^rho) Q_w(W * 2^rho)^T + b

   so the activation quantizer stays per tensor (one static FP4 scale A / fp_max) and the per-channel
   factors are a one-time weight pre-computation. Without quantization the pre-shift is exact (powers
   of two). The layer is a `QuantizedLinear` of the FP4 codes of W * 2^rho (per output channel scales)
   whose inputs are divided by `input_scale` = 2^rho and fake-quantized by a static per-tensor
   `ActivationQuantizer` whose range is [-A, A]. Since rho depends on A (and on the activation
   format), every activation candidate re-quantizes the shifted weight with the current per-row
   fractions.

Deviations from the paper and its code (nbasyl/LLM-FP4):
- the max-value candidates are fractions of absmax in [min_fraction, 1] (default 20 in [0.3, 1]); the
  reference multiplies the exponent bias by 100 factors in [0.01, 1.2], most of which give maxima far
  above absmax;
- the reference simulates the per-channel activation scales with the *unshifted* quantized weight
  (the shift applied in higher precision); here the shifted weight W * 2^rho is what is quantized, so
  every stored weight is a real FP4 code (the shift also changes the weight search's input);
- the search uses a random subsample of the calibration tokens (`search_tokens`, default 256) and one
  round by default (the reference: all of 32 x 2048 tokens, 3 rounds); the per-channel maxima use all
  calibration tokens;
- the activation formats searched are those `slimlm.quant.activation` can hold: only E2M1 today
  (its grid list has no fp4_e1m2 / fp4_e3m0), so the format search covers the weights only; the
  weight formats E1M2 / E3M0 are the reference's FP formula with the default bias 2^(E-1);
- no bias correction, no Pearson metric, and the linears are searched one at a time (q, k, v each get
  their own activation grid, as in the reference); the LM head and embeddings stay in float.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.core.stage import Stage, register
from slimlm.errors import SlimlmError
from slimlm.quant.activation import ACTIVATION_FORMATS, ActivationQuantizer
from slimlm.quant.grid import FP4_MAGNITUDES, QuantizedWeight, fp_decode, fp_encode, fp_max
from slimlm.quant.qlinear import QuantizedLinear

FP4_FORMATS = ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0")
EXPONENT_BITS = {"fp4_e1m2": 1, "fp4_e2m1": 2, "fp4_e3m0": 3}
MANTISSA_BITS = {"fp4_e1m2": 2, "fp4_e2m1": 1, "fp4_e3m0": 0}
CANDIDATES_PER_MATMUL = 8  # weight candidates stacked into one GEMM during the search


def activation_search_formats(search: bool) -> list[str]:
    """The 4-bit FP activation formats to try: E2M1, plus the other splits the activation grid can hold."""
    if not search:
        return ["fp4_e2m1"]
    return [fmt for fmt in FP4_FORMATS if ACTIVATION_FORMATS.get(fmt) == 4]


def weight_search_formats(search: bool, start: str) -> list[str]:
    return [start] + [fmt for fmt in FP4_FORMATS if fmt != start] if search else [start]


def fp4_round(v: Tensor, fmt: str) -> Tensor:
    """fp_decode(fp_encode(v, fmt), fmt) by arithmetic, about 5x faster (the search's inner loop): clamp to
    the largest value, step = 2^(max(floor(log2|v|), e_min) - M) (exact, from frexp), round(v / step) * step.
    The same values except at exact ties between two grid values, where torch.round goes to the even
    integer rather than to the even code (a rounding of E3M0 ties; the stored codes always use fp_encode)."""
    mantissa = MANTISSA_BITS[fmt]
    magnitudes = FP4_MAGNITUDES[fmt]
    min_exponent = int(math.log2(magnitudes[2 ** mantissa]))  # the smallest normal value's exponent
    a = v.abs().clamp_(max=magnitudes[-1])
    _, exponent = torch.frexp(a)  # a = f 2^exponent with f in [0.5, 1): floor(log2 a) = exponent - 1
    step = torch.exp2(exponent.sub_(1 + mantissa).clamp_(min=min_exponent - mantissa).float())
    return a.div_(step).round_().mul_(step).copysign_(v)


def fp_fake_quantize(x: Tensor, absmax: Tensor | float, fmt: str, fast: bool = False) -> Tensor:
    """s * fp(x / s) with s = absmax / fp_max(fmt) (absmax broadcasts against x; 0 means any scale): the
    values `ActivationQuantizer` and `quantize_weight` give for the same range (`fast`: by `fp4_round`)."""
    absmax = torch.as_tensor(absmax, dtype=torch.float32, device=x.device)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / fp_max(fmt)
    if fast:
        return fp4_round(x.float() / scale, fmt).mul_(scale)
    return fp_decode(fp_encode(x.float() / scale, fmt), fmt) * scale


def preshift_exponents(channel_max: Tensor, tensor_max: float, fmt: str, max_shift: int | None = None) -> Tensor:
    """Integer rho_j <= 0 (int64, one per input channel) of the pre-shifted exponent bias: the channel's
    real-valued bias b_j = log2(fp_max) - log2(max|X_j|) minus the tensor's t = log2(fp_max) - log2(A),
    each rounded, clamped to [0, 2^E - 1] (or `max_shift`) and negated. A channel whose maximum is
    A / 2^k gets rho_j = -k: dividing it by 2^rho_j lifts it to the tensor's range."""
    limit = 2 ** EXPONENT_BITS[fmt] - 1 if max_shift is None else max_shift
    if tensor_max <= 0:
        return torch.zeros(channel_max.shape, dtype=torch.long, device=channel_max.device)
    offset = math.log2(fp_max(fmt))
    m = channel_max.double().clamp_min(tensor_max * 2.0 ** -60)  # all-zero channels: the largest shift
    channel_bias = torch.round(offset - torch.log2(m))
    tensor_bias = round(offset - math.log2(tensor_max))  # Python's round: half to even, as torch.round
    return -(channel_bias - tensor_bias).clamp(0, limit).long()


def fold_preshift(weight: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """(W * 2^rho, 2^rho): the weight with the per-channel factors folded into its columns and the input
    divisor, so that F.linear(x / 2^rho, W * 2^rho) == F.linear(x, W) in exact arithmetic (and in float,
    barring overflow: powers of two)."""
    factor = torch.pow(2.0, rho.to(weight.device).float())
    return weight.float().contiguous() * factor[None, :], factor


@dataclass
class FP4Choice:
    """What the search picked for one linear."""

    weight_format: str
    weight_fraction: Tensor  # (out,) the weight maximum of each output row as a fraction of its absmax
    activation_format: str
    activation_max: float  # A: the static per-tensor range [-A, A] of x / 2^rho
    rho: Tensor  # (in,) int64, <= 0
    error: float  # sum of squared output errors on the search tokens

    def label(self) -> str:
        return f"llm_fp4(w={self.weight_format[4:]},a={self.activation_format[4:]})"


def quantize_shifted_weight(weight: Tensor, rho: Tensor, fmt: str, fraction: Tensor) -> QuantizedWeight:
    """FP4 codes of W * 2^rho with per-row scales fraction * rowmax / fp_max (values beyond clip)."""
    shifted, _ = fold_preshift(weight, rho)
    absmax = shifted.abs().amax(dim=1) * fraction.to(shifted.device)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scale = (absmax / fp_max(fmt))[:, None]
    return QuantizedWeight(codes=fp_encode(shifted / scale, fmt), scale=scale, zero=torch.zeros_like(scale),
                           bits=4, group_size=None, symmetric=True, fmt=fmt)


def build_layer(weight: Tensor, bias: Tensor | None, choice: FP4Choice,
                dtype: torch.dtype = torch.float32) -> QuantizedLinear:
    """The FP4 W4A4 layer: codes of W * 2^rho, inputs divided by 2^rho and quantized per tensor on [-A, A]
    (float buffers in `dtype`, the quantizer's range and the divisor in float32)."""
    quantized = quantize_shifted_weight(weight, choice.rho, choice.weight_format, choice.weight_fraction)
    # float32 scales: the layer computes exactly what the search simulated
    layer = QuantizedLinear.from_quantized(quantized, None if bias is None else bias.detach(),
                                           scale_dtype=torch.float32).to(dtype)
    quantizer = ActivationQuantizer(4, "per_tensor", True, choice.activation_format)
    quantizer.observed_min.fill_(-choice.activation_max)
    quantizer.observed_max.fill_(choice.activation_max)
    _, factor = fold_preshift(weight, choice.rho)
    return layer.quantize_inputs(quantizer, input_scale=factor)


class _Search:
    """The per-linear search state: float outputs, calibration sample, candidate fractions."""

    def __init__(self, weight: Tensor, x: Tensor, channel_max: Tensor, fractions: Tensor, exponent_bias: bool,
                 max_shift: int | None) -> None:
        self.weight, self.x = weight.float().contiguous(), x.float().contiguous()
        self.target = self.x @ self.weight.T
        self.channel_max = channel_max.float().to(self.weight.device)
        self.absmax = float(self.channel_max.max())
        self.fractions = fractions.to(self.weight.device)
        self.exponent_bias, self.max_shift = exponent_bias, max_shift

    def rho(self, fmt: str, tensor_max: float) -> Tensor:
        if not self.exponent_bias:
            return torch.zeros(self.weight.shape[1], dtype=torch.long, device=self.weight.device)
        return preshift_exponents(self.channel_max, tensor_max, fmt, self.max_shift)

    def activations(self, fmt: str, tensor_max: float, rho: Tensor) -> Tensor:
        return fp_fake_quantize(self.x / torch.pow(2.0, rho.float())[None, :], tensor_max, fmt, fast=True)

    def row_errors(self, xq: Tensor, wq: Tensor) -> Tensor:
        return (xq @ wq.T - self.target).pow_(2).sum(dim=0)

    def weight_search(self, xq: Tensor, shifted: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
        """Best fraction (out,) of each row's absmax and its output error (out,), fractions tried from 1 down."""
        rows = shifted.shape[0]
        rowmax = shifted.abs().amax(dim=1)
        best = torch.full((rows,), math.inf, device=shifted.device)
        chosen = torch.ones(rows, device=shifted.device)
        for start in range(0, len(self.fractions), CANDIDATES_PER_MATMUL):
            batch = self.fractions[start:start + CANDIDATES_PER_MATMUL]
            wq = fp_fake_quantize(shifted[None], (rowmax[None, :] * batch[:, None])[..., None], fmt, fast=True)
            outputs = (xq @ wq.reshape(-1, shifted.shape[1]).T).reshape(xq.shape[0], len(batch), rows)
            errors = (outputs - self.target[:, None, :]).pow_(2).sum(dim=0)  # (candidates, rows)
            for k in range(len(batch)):
                better = errors[k] < best  # strict: the larger maximum (absmax first) wins ties
                best = torch.where(better, errors[k], best)
                chosen = torch.where(better, batch[k], chosen)
        return chosen, best

    def activation_search(self, fmt: str, w_fmt: str, w_fraction: Tensor) -> tuple[float, float]:
        """Best tensor maximum A (from absmax down) for activation format `fmt` and its total output error."""
        best, chosen = math.inf, self.absmax
        cache: dict[tuple, Tensor] = {}
        for fraction in self.fractions.tolist():
            tensor_max = self.absmax * fraction
            rho = self.rho(fmt, tensor_max)
            key = tuple(rho.tolist())
            if key not in cache:  # the weight changes only with rho
                shifted, _ = fold_preshift(self.weight, rho)
                rowmax = shifted.abs().amax(dim=1) * w_fraction
                cache = {key: fp_fake_quantize(shifted, rowmax[:, None], w_fmt, fast=True)}
            error = float(self.row_errors(self.activations(fmt, tensor_max, rho), cache[key]).sum())
            if error < best:
                best, chosen = error, tensor_max
        return chosen, best


def search_linear(weight: Tensor, x: Tensor, channel_max: Tensor, *, search_formats: bool = True,
                  weight_format: str = "fp4_e2m1", max_grid: int = 20, min_fraction: float = 0.3,
                  exponent_bias: bool = True, max_shift: int | None = None, rounds: int = 1) -> FP4Choice:
    """Search formats, maxima and pre-shifts of one linear (`weight` (out, in)) on sample inputs `x`
    (tokens, in); `channel_max` (in,) is max |X_j| over all calibration tokens."""
    if x.dim() != 2 or x.shape[1] != weight.shape[1] or x.shape[0] == 0:
        raise SlimlmError(f"expected (tokens, {weight.shape[1]}) search inputs, got shape {tuple(x.shape)}")
    fractions = torch.linspace(1.0, min_fraction, max_grid)  # absmax first: ties keep it
    search = _Search(weight, x, channel_max, fractions, exponent_bias, max_shift)
    w_formats = weight_search_formats(search_formats, weight_format)
    a_formats = activation_search_formats(search_formats)
    w_fmt, a_fmt, tensor_max = weight_format, "fp4_e2m1", search.absmax
    w_fraction = torch.ones(weight.shape[0], device=search.weight.device)
    error = math.inf
    for _ in range(rounds):
        rho = search.rho(a_fmt, tensor_max)
        xq = search.activations(a_fmt, tensor_max, rho)
        shifted, _ = fold_preshift(search.weight, rho)
        results = {fmt: search.weight_search(xq, shifted, fmt) for fmt in w_formats}
        w_fmt = min(w_formats, key=lambda fmt: float(results[fmt][1].sum()))  # first (the start) wins ties
        w_fraction = results[w_fmt][0]
        found = {fmt: search.activation_search(fmt, w_fmt, w_fraction) for fmt in a_formats}
        a_fmt = min(a_formats, key=lambda fmt: found[fmt][1])
        tensor_max, error = found[a_fmt]
    return FP4Choice(w_fmt, w_fraction.cpu(), a_fmt, tensor_max, search.rho(a_fmt, tensor_max).cpu(), error)


def output_error(weight: Tensor, x: Tensor, choice: FP4Choice) -> float:
    """Sum of squared output errors of the layer `choice` describes against the float layer on inputs x."""
    layer = build_layer(weight, None, choice).to(x.device)
    with torch.no_grad():
        return float((layer(x.float()) - x.float() @ weight.float().T).pow(2).sum())


def llm_fp4_block(context: BlockContext, stage, report: CompressionReport) -> None:
    """Replace the block's target linears with searched FP4 W4A4 layers (see the module docstring)."""
    names = list(context.targets)
    modules = {name: context.module(name) for name in names}
    channel_max: dict[str, Tensor] = {}
    samples: dict[str, list[Tensor]] = {name: [] for name in names}
    batches = len(context.inputs.hidden) if context.inputs is not None else 1
    per_batch = max(1, math.ceil(stage.search_tokens / batches))
    generator = torch.Generator().manual_seed(1000 + context.index)

    def sink(name: str, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if not bool(torch.isfinite(rows).all()):
            raise SlimlmError(f"calibration inputs of {name} hold NaN or infinite values; check the model in float")
        peak = rows.abs().amax(dim=0)
        channel_max[name] = peak if name not in channel_max else torch.maximum(channel_max[name], peak)
        pick = torch.randperm(rows.shape[0], generator=generator)[:per_batch].to(rows.device)
        samples[name].append(rows[pick])

    context.collect(modules, sink)
    unseen = [name for name in names if name not in channel_max]
    if unseen:
        raise SlimlmError(f"no calibration input reached {', '.join(unseen)}: LLM-FP4 calibrates every "
                          "activation grid; check that the layer runs")
    layers = {}
    for name in names:
        start = time.perf_counter()
        module = modules[name]
        weight = linear_weight(module).detach()
        choice = search_linear(weight.float(), torch.cat(samples[name]), channel_max[name],
                               search_formats=stage.search_formats, weight_format=stage.weight_format,
                               max_grid=stage.max_grid, min_fraction=stage.min_fraction,
                               exponent_bias=stage.exponent_bias, max_shift=stage.max_shift,
                               rounds=stage.search_rounds)
        bias = module.bias.detach() if module.bias is not None else None
        layers[name] = build_layer(weight.float(), bias, choice, weight.dtype)
        samples[name] = []
        report.layers.append(LayerReport(name, choice.label(), time.perf_counter() - start, choice.error))
    for name, layer in layers.items():
        context.replace(name, layer)


@register
class LLMFP4Stage(Stage):
    """LLM-FP4 (Liu et al., EMNLP 2023): FP4 W4A4 with a joint format / maximum-value search and per-channel
    pre-shifted activation exponent biases folded into the weights (`slimlm.quant.llm_fp4`)."""

    method: Literal["llm_fp4"] = "llm_fp4"
    weight_format: Literal["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"] = Field(
        "fp4_e2m1", description="the weights' 4-bit FP format (the search's start when search_formats)")
    search_formats: bool = Field(True, description="search the exponent / mantissa split (E1M2, E2M1, E3M0) by the "
                                 "layer output error (activations: the FP4 formats the activation grid holds)")
    max_grid: int = Field(20, description="candidate maximum values per format, evenly spaced in "
                          "[min_fraction, 1] x absmax")
    min_fraction: float = Field(0.3, description="the smallest candidate maximum as a fraction of absmax")
    exponent_bias: bool = Field(True, description="per-channel pre-shifted exponent bias of the activations "
                                "(powers of two folded into the weight columns); false: per-tensor only")
    max_shift: int | None = Field(None, description="largest per-channel shift |rho_j| (None: 2^E - 1, the "
                                  "reference's clamp)")
    search_tokens: int = Field(256, ge=16, description="calibration tokens sampled per linear for the search")
    search_rounds: int = Field(1, ge=1, description="alternating weight / activation search rounds (the reference: 3)")

    @field_validator("max_grid")
    @classmethod
    def _max_grid(cls, grid: int) -> int:
        if grid < 2:
            raise ValueError(f"max_grid must be at least 2 (got {grid}): absmax and at least one smaller maximum")
        return grid

    @field_validator("min_fraction")
    @classmethod
    def _min_fraction(cls, fraction: float) -> float:
        if not 0 < fraction < 1:  # NaN fails too
            raise ValueError(f"min_fraction must be in (0, 1) (got {fraction}); e.g. 0.3")
        return fraction

    @field_validator("max_shift")
    @classmethod
    def _max_shift(cls, shift: int | None) -> int | None:
        if shift is not None and not 0 <= shift <= 30:
            raise ValueError(f"max_shift must be between 0 and 30 (got {shift}); None uses 2^E - 1")
        return shift

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        llm_fp4_block(context, self, report)
