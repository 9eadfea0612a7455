"""Round-to-nearest (RTN) weight quantization: the data-free baseline every method is compared with.

Each weight is mapped to the nearest point of the uniform grid of `slimlm.quant.grid` (per group,
per output channel or per tensor; min-max range, or the MSE-optimal clipping search), with no
calibration data and no error compensation.
"""

from __future__ import annotations

import time

from slimlm.compress.engine import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.compress.recipe import RTNStage
from slimlm.quant.grid import quantize_weight
from slimlm.quant.qlinear import QuantizedLinear


def rtn_block(context: BlockContext, stage: RTNStage, report: CompressionReport) -> None:
    for name in context.targets:
        start = time.perf_counter()
        module = context.module(name)
        weight = linear_weight(module).detach().float()
        quantized = quantize_weight(
            weight, stage.bits, stage.group_columns, stage.symmetric, clip=stage.clip, granularity=stage.granularity
        )
        error = float((quantized.dequantize() - weight).pow(2).sum())
        context.replace(name, QuantizedLinear.replacing(module, quantized))
        report.layers.append(LayerReport(name, "rtn", time.perf_counter() - start, error))
