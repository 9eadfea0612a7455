"""LPLR: randomized low-rank and low-precision factorization (Saha, Srivastava and Pilanci, "Matrix
Compression via Randomized Low Rank and Low Precision Factorization", NeurIPS 2023, Algorithm 1).

For a weight W (out x in), read as the paper's A with its columns in R^out:

1. sketch the column space with a Gaussian matrix S (in x r, entries N(0, 1/r)): W S (out x r);
2. quantize the sketch: Z = Q(W S), the left factor `up`;
3. project the weight onto the quantized basis: down* = argmin ||Z D - W||_F = Z^+ W (least squares);
4. quantize it: down = Q'(down*).

W ~= Z Q'(Z^+ W): two low-precision factors. Q and Q' are slimlm's uniform grid (`slimlm.quant.grid`),
round to nearest, `bits` each. Deviation: the paper gives each quantizer one dynamic range for the whole
matrix; here each row has its own (asymmetric min-max per output channel, one float16 scale and one zero
point per row), which costs r + out scales and is never worse.

Size: a `rank`, or `bytes_reduction`, the fraction of the layer's 16-bit bytes removed: the rank whose two
`bits`-bit factors take (1 - bytes_reduction) of 2 m n bytes, capped at min(m, n). With bits 16 that is
`parameter_reduction` of SVD, so LPLR and SVD with float (16-bit) factors are compared at equal bytes. A layer
whose factors would not take fewer bytes than its 16-bit dense weight stays dense.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimlm.core.blocks import CompressionReport, linear_weight, replace_module
from slimlm.core.stage import ModelContext, register
from slimlm.lowrank.common import FactorizationLog, SizeFields, target_linears
from slimlm.lowrank.factorize import output_error
from slimlm.lowrank.layer import LowRankLinear
from slimlm.models.adapter import linear_shape
from slimlm.progress import progress
from slimlm.quant.grid import quantize_weight
from slimlm.quant.qlinear import QuantizedLinear


def lplr(weight: torch.Tensor, rank: int, bits: int, generator: torch.Generator):
    """(up, down) QuantizedWeights of Algorithm 1 for an (out, in) weight."""
    out_features, in_features = weight.shape
    W = weight.double()
    sketch = torch.randn(in_features, rank, generator=generator, dtype=torch.float64) / rank ** 0.5
    up = quantize_weight((W @ sketch.to(W.device)).float(), bits, None, symmetric=False)
    Z = up.dequantize().double()
    down_star = torch.linalg.lstsq(Z, W, driver="gelsd" if W.device.type == "cpu" else None).solution
    down = quantize_weight(down_star.float(), bits, None, symmetric=False)
    return up, down


@register
class LPLRStage(SizeFields):
    """LPLR: a Gaussian sketch of the column space, quantized, and the quantized projection onto it."""

    method: Literal["lplr"] = "lplr"
    whole_model: ClassVar[bool] = True
    reduction_field: ClassVar[str] = "bytes_reduction"
    bytes_reduction: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's 16-bit bytes removed")
    bits: int = Field(8, ge=2, le=8, description="bits of each factor's codes")
    seed: int = 0

    def layer_rank(self, in_features: int, out_features: int) -> int:
        if self.rank is not None:
            return self.rank
        budget_bits = (1 - self.bytes_reduction) * 16 * in_features * out_features
        return max(1, min(int(budget_bits // (self.bits * (in_features + out_features))), in_features, out_features))

    @torch.no_grad()
    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        _adapter, linears = target_linears(context.model, self)
        generator = torch.Generator().manual_seed(self.seed)
        log = FactorizationLog(f"lplr-{self.bits}bit")
        for name, module in progress(linears.items(), desc="lplr", total=len(linears)):
            start = time.perf_counter()
            in_features, out_features = linear_shape(module)
            rank = self.layer_rank(in_features, out_features)
            if rank * (in_features + out_features) * self.bits >= 16 * in_features * out_features:
                log.stays_dense(name, f"{self.bits}-bit factors of rank {rank} take no fewer bytes than the 16-bit "
                                "weight", in_features, out_features, report)
                continue
            weight = linear_weight(module).detach().float()
            up, down = lplr(weight, rank, self.bits, generator)
            bias = getattr(module, "bias", None)
            layer = LowRankLinear(in_features, out_features, rank, bias is not None)
            layer.down = QuantizedLinear.from_quantized(down)
            layer.up = QuantizedLinear.from_quantized(up, None if bias is None else bias.detach())
            replace_module(context.model, name, layer.to(weight.device))
            log.factorized(name, rank, in_features, out_features, start,
                           output_error(weight - layer.correction(), None), report)
        log.summarize(report, bits=self.bits)
