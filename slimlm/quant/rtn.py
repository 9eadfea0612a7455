"""Round-to-nearest (RTN) weight quantization: the data-free baseline every method is compared with.

Each weight is mapped to the nearest point of the uniform grid of `slimlm.quant.grid` (per group,
per output channel or per tensor; min-max range, or the MSE-optimal clipping search), with no
calibration data and no error compensation.

With `activations` the stage quantizes the inputs too (W8A8, `slimlm.quant.w8a8.Int8Linear`): 8-bit
symmetric per-channel weights by the same rule, activations per token at run time (no data), or per
tensor from the min / max of this block's calibration inputs, observed on its float linears (the
inputs already carry the earlier blocks' quantization, as the engine feeds them). With
`activations.outlier_threshold`, LLM.int8() (`slimlm.quant.llm_int8.LLMInt8Linear`): the same, plus
input columns holding an |x| >= threshold computed in float from float16 weights.
"""

from __future__ import annotations

import time

from slimlm.compress.engine import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.compress.recipe import ActivationQuantConfig, RTNStage
from slimlm.errors import SlimlmError
from slimlm.quant.grid import quantize_weight
from slimlm.quant.llm_int8 import LLMInt8Linear
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
    label = "rtn-w8a8" if stage.activations.outlier_threshold is None else "llm-int8"
    replace_with_int8(context, stage.activations, stage.clip, report, label)


def replace_with_int8(context: BlockContext, activations: ActivationQuantConfig, clip: str,
                      report: CompressionReport, label: str) -> None:
    """Replace the block's target linears with `Int8Linear` (or `LLMInt8Linear` with an outlier threshold);
    static per-tensor ranges are observed on the block's float linears first."""
    layers = {}
    for name in context.targets:
        start = time.perf_counter()
        module = context.module(name)
        layer = int8_layer(module, activations, clip)
        error = float((layer.dequantize_weight() - linear_weight(module).detach().float()).pow(2).sum())
        layers[name] = layer
        report.layers.append(LayerReport(name, label, time.perf_counter() - start, error))
    if activations.granularity == "per_tensor":  # static ranges: observe the float block's inputs
        modules = {name: context.module(name) for name in layers}
        context.collect(modules, lambda name, x: layers[name].input_quantizer.observe(x))
        unseen = [name for name, layer in layers.items() if not layer.input_quantizer.calibrated]
        if unseen:  # else the model would save fine and fail at its first forward
            raise SlimlmError(f"no calibration input reached {', '.join(unseen)}: a static (per_tensor) activation "
                              "grid needs one; use granularity: per_token, or check that the layer runs")
    for name, layer in layers.items():
        context.replace(name, layer)


def int8_layer(module, activations: ActivationQuantConfig, clip: str) -> Int8Linear:
    """The `Int8Linear` (`LLMInt8Linear` with an outlier threshold) replacing a float linear; a static
    per-tensor grid still has to observe calibration inputs."""
    weight = linear_weight(module).detach()
    if activations.outlier_threshold is None:
        return Int8Linear.from_float(weight, module.bias, activations.bits, activations.granularity,
                                     activations.symmetric, clip=clip)
    return LLMInt8Linear.from_float(weight, module.bias, activations.bits, activations.granularity,
                                    activations.symmetric, clip=clip, outlier_threshold=activations.outlier_threshold)
