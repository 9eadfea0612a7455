"""Low-rank error compensation, the part LoRC and EoRA share: after an earlier stage of the same recipe
compressed a linear (quantization, pruning), fit a rank-r correction to its error E = W - W_hat and keep it
beside the compressed layer: y = layer_hat(x) + (x down^T) up^T (`LowRankLinear` with a base).
With `factor_bits` the two factors are stored on an integer grid (round to nearest, one asymmetric scale per
rank component), as EoRA's authors report quantizing theirs to 4 and 3 bits.

The engine keeps each block's weights as they were before the recipe touched the block
(`Stage.needs_original_weights`), so the error is measured against the uncompressed weight, whatever the
earlier stages were. A compensation stage must come after the stage whose error it corrects.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from pydantic import Field
from torch import Tensor, nn

from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.core.stage import Stage
from slimlm.errors import SlimlmError
from slimlm.lowrank.common import check_ranks
from slimlm.lowrank.factorize import output_error
from slimlm.lowrank.layer import LowRankLinear, dense_of
from slimlm.models.adapter import ModelAdapter


class CompensationFields(Stage):
    rank: int = Field(..., ge=1, description="rank of the correction of each target linear")
    factor_bits: int | None = Field(
        None, ge=2, le=8, description="quantize both factors to this many bits (null: the float storage dtype)")

    def check(self, adapter: ModelAdapter, layers: dict[str, int]) -> None:
        check_ranks(self, self.rank, adapter, layers)


def compensate_block(context: BlockContext, stage: CompensationFields, report: CompressionReport,
                     fit: Callable[[str, Tensor], tuple[Tensor, Tensor]],
                     hessians: dict[str, Tensor] | None = None) -> None:
    """Wrap each target linear of the block with the correction `fit(name, E)` returns as (up, down)."""
    originals = context.original_weights or {}
    float_dtype = context.adapter.embedding.weight.dtype
    for name in context.targets:
        start = time.perf_counter()
        module = context.module(name)
        if name not in originals:
            raise SlimlmError(f"{stage.method}: {name} was already compressed when the recipe started; "
                              "compensation corrects the stages of its own recipe")
        error = originals[name].float() - current_weight(module)
        if not bool(error.any()):
            raise SlimlmError(f"{stage.method}: {name} is unchanged, so there is no error to compensate; put "
                              f"{stage.method} after a quantization or pruning stage that targets it")
        up, down = fit(name, error)
        if stage.factor_bits is None:
            layer = LowRankLinear.from_factors(up, down, base=module)
            layer.up.to(float_dtype), layer.down.to(float_dtype)
        else:
            layer, up, down = quantized_correction(up, down, module, stage.factor_bits, float_dtype)
        layer.to(error.device)
        context.replace(name, layer)
        hessian = None if hessians is None else hessians[name]
        residual = output_error(error - up @ down, hessian) / max(output_error(error, hessian), 1e-30)
        report.layers.append(LayerReport(name, stage.method, time.perf_counter() - start, residual))


def quantized_correction(up: Tensor, down: Tensor, base: nn.Module, bits: int,
                         float_dtype: torch.dtype) -> tuple[LowRankLinear, Tensor, Tensor]:
    """The correction with both factors on a `bits`-bit grid, one scale and zero point per rank component
    (a row of down, a column of up: `up` is stored transposed); returns the layer and the factors it holds."""
    from slimlm.quant.grid import quantize_weight
    from slimlm.quant.qlinear import QuantizedLinear

    rank = up.shape[1]
    layer = LowRankLinear(down.shape[1], up.shape[0], rank, base=base, up_transposed=True)
    quantized_down = quantize_weight(down, bits, None, symmetric=False)
    quantized_up = quantize_weight(up.T.contiguous(), bits, None, symmetric=False)
    layer.down = QuantizedLinear.from_quantized(quantized_down).to(float_dtype)
    layer.up = QuantizedLinear.from_quantized(quantized_up).to(float_dtype)
    return layer, quantized_up.dequantize().T, quantized_down.dequantize()


@torch.no_grad()
def current_weight(module: nn.Module) -> Tensor:
    """The (out, in) float32 weight a (possibly compressed) linear applies now."""
    if not getattr(module, "is_compressed_linear", False):
        return linear_weight(module).detach().float()  # also GPT-2's transposed Conv1D
    return dense_of(module).detach()
