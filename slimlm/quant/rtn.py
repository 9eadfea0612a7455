"""Round-to-nearest (RTN) weight quantization: the data-free baseline every method is compared with.

Each weight is mapped to the nearest point of the uniform grid of `slimlm.quant.grid` (per group,
per output channel or per tensor; min-max range, or the MSE-optimal clipping search), with no
calibration data and no error compensation.

With `activations` the stage quantizes the inputs too: activations per token at run time (no data),
or per tensor from the min / max of this block's calibration inputs, observed on its float linears
(the inputs already carry the earlier blocks' quantization, as the engine feeds them). 8-bit
symmetric per-channel integer weights with integer activations run the int8 GEMM
(`slimlm.quant.w8a8.Int8Linear`, W8A8); any other combination (W4A8, W6A6, W4A4, FP8 weights and
activations) is simulated by a `QuantizedLinear` with an input quantizer (exact values, float
arithmetic). With `activations.outlier_threshold`, LLM.int8() (`slimlm.quant.llm_int8.LLMInt8Linear`):
W8A8 plus input columns holding an |x| >= threshold computed in float from float16 weights.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.core.stage import Stage, register
from slimlm.errors import SlimlmError
from slimlm.quant.fields import ActivationQuantConfig, ClipField, WeightActivationFields, WeightQuantFields
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
        quantized = quantize_weight(weight, stage.bits, stage.group_columns, stage.symmetric, clip=stage.clip,
                                    granularity=stage.granularity, fmt=stage.fmt)
        error = float((quantized.dequantize() - weight).pow(2).sum())
        context.replace(name, QuantizedLinear.replacing(module, quantized))
        report.layers.append(LayerReport(name, "rtn", time.perf_counter() - start, error))


def w8a8_block(context: BlockContext, stage: RTNStage, report: CompressionReport) -> None:
    label = "rtn-w8a8" if stage.activations.outlier_threshold is None else "llm-int8"
    replace_quantizing_inputs(context, stage, stage.activations, stage.clip, report, label)


def uses_int8_gemm(weights: WeightQuantFields, activations: ActivationQuantConfig) -> bool:
    """8-bit symmetric per-channel integer weights and integer activations: the real int8 GEMM (`Int8Linear`)."""
    return weights.int8_channel_grid and activations.fmt == "int"


def replace_quantizing_inputs(context: BlockContext, weights: WeightQuantFields, activations: ActivationQuantConfig,
                              clip: str, report: CompressionReport, label: str) -> None:
    """Replace the block's target linears with weight-and-activation quantized layers (`wa_layer`);
    static per-tensor ranges are observed on the block's float linears first."""
    layers = {}
    for name in context.targets:
        start = time.perf_counter()
        module = context.module(name)
        layer = wa_layer(module, weights, activations, clip)
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


def wa_layer(module, weights: WeightQuantFields, activations: ActivationQuantConfig, clip: str):
    """The layer replacing a float linear when its inputs are quantized too: `Int8Linear` (the int8 GEMM;
    `LLMInt8Linear` with an outlier threshold) for W8A8 integer grids, else a `QuantizedLinear` with an
    input quantizer (simulated W4A8, W6A6, W4A4, FP8). A static per-tensor grid still has to observe
    calibration inputs."""
    weight = linear_weight(module).detach()
    if activations.outlier_threshold is not None:
        return LLMInt8Linear.from_float(weight, module.bias, activations.bits, activations.granularity,
                                        activations.symmetric, clip=clip, outlier_threshold=activations.outlier_threshold)
    if uses_int8_gemm(weights, activations):
        return Int8Linear.from_float(weight, module.bias, activations.bits, activations.granularity,
                                     activations.symmetric, clip=clip)
    quantized = quantize_weight(weight.float(), weights.bits, weights.group_columns, weights.symmetric, clip=clip,
                                granularity=weights.granularity, fmt=getattr(weights, "fmt", "int"))
    return QuantizedLinear.replacing(module, quantized).quantize_inputs(activations)


@register
class RTNStage(WeightActivationFields, ClipField, Stage):
    """Round-to-nearest weight quantization (data-free baseline); with `activations`, the inputs too (W8A8
    with an integer GEMM; W4A8, W6A6, W4A4 and FP8 simulated)."""

    method: Literal["rtn"] = "rtn"
    activations: ActivationQuantConfig | None = Field(
        None, description="also quantize the inputs (8-bit symmetric per-channel weights: an integer GEMM)")

    @model_validator(mode="after")
    def _outliers(self):
        self.check_outlier_path(self.activations)
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None and self.activations.granularity == "per_tensor"

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        rtn_block(context, self, report)
