"""Round-to-nearest (RTN) weight quantization: the data-free baseline every method is compared with.

Each weight is mapped to the nearest point of the uniform grid of `slimlm.quant.grid` (per group,
per output channel or per tensor; min-max range, or the MSE-optimal clipping search), with no
calibration data and no error compensation.

With `activations` the stage quantizes the inputs too (W8A8, `slimlm.quant.w8a8.Int8Linear`): 8-bit
symmetric per-channel weights by the same rule, activations per token at run time (no data), or per
tensor from the min / max of this block's calibration inputs, observed on its float linears (the
inputs already carry the earlier blocks' quantization, as the engine feeds them).
"""

from __future__ import annotations

import time

from slimlm.compress.engine import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.compress.recipe import RTNStage
from slimlm.quant.grid import quantize_weight
from slimlm.quant.qlinear import QuantizedLinear
from slimlm.quant.w8a8 import Int8Linear


def rtn_block(context: BlockContext, stage: RTNStage, report: CompressionReport) -> None:
    if stage.activations is not None:
        return w8a8_block(context, stage, report)
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


def w8a8_block(context: BlockContext, stage: RTNStage, report: CompressionReport) -> None:
    activations = stage.activations
    layers = {}
    for name in context.targets:
        start = time.perf_counter()
        module = context.module(name)
        weight = linear_weight(module).detach()
        layer = Int8Linear.from_float(weight, module.bias, activations.bits, activations.granularity,
                                      activations.symmetric, clip=stage.clip)
        error = float((layer.dequantize_weight() - weight.float()).pow(2).sum())
        layers[name] = layer
        report.layers.append(LayerReport(name, "rtn-w8a8", time.perf_counter() - start, error))
    if activations.granularity == "per_tensor":  # static ranges: observe the float block's inputs
        modules = {name: context.module(name) for name in layers}
        context.collect(modules, lambda name, x: layers[name].input_quantizer.observe(x))
    for name, layer in layers.items():
        context.replace(name, layer)
