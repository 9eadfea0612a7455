"""Quantize the LM head (round to nearest): the largest single matrix a small model reads per token.

SmolLM2-135M's head is 49152 x 576 (tied to the embedding): 113 MB in float32, two thirds of the bytes a
W4 g64 model reads per generated token when the head stays float. Stored as 8-bit per-channel symmetric
codes it runs through the int8 packed kernel, as 4-bit grouped codes through the int4 kernel
(`slimlm.quant.qlinear`), during generation on CPUs where those kernels are fast.

A tied head is untied: the embedding keeps its float weights (a lookup reads one row per token, so it
costs memory, not decode time) and the head gets its own quantized copy. The quality cost is measured
like any method's (`benchmarks/deploy.py`: perplexity and KL to float32).
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from slimlm.core.blocks import CompressionReport, LayerReport
from slimlm.core.stage import ModelContext, Stage, register
from slimlm.errors import SlimlmError
from slimlm.quant.fields import GroupSize
from slimlm.quant.grid import quantize_weight
from slimlm.quant.qlinear import QuantizedLinear


def quantize_lm_head_(model, bits: int = 8, group_size: int | None = None, symmetric: bool = True) -> QuantizedLinear:
    """Replace `model`'s output embedding by a QuantizedLinear (RTN); returns it. Unties a tied head."""
    head = model.get_output_embeddings()
    if isinstance(head, QuantizedLinear):
        raise SlimlmError("the LM head is already quantized")
    if head is None or not hasattr(head, "weight") or head.weight.dim() != 2:
        raise SlimlmError(f"{type(model).__name__} has no linear LM head to quantize")
    quantized = quantize_weight(head.weight.detach().float(), bits, group_size, symmetric)
    layer = QuantizedLinear.replacing(head, quantized)
    model.set_output_embeddings(layer)
    model.config.tie_word_embeddings = False  # a rebuilt model must not tie the embedding to this layer
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False
    return layer


@register
class QuantizeHeadStage(Stage):
    """Round-to-nearest quantization of the LM head (8-bit per channel, or 4-bit grouped)."""

    method: Literal["quantize_head"] = "quantize_head"
    whole_model: ClassVar[bool] = True  # the head is outside the blocks: done once, before the block pass
    bits: Literal[4, 8] = Field(8, description="8: per-channel symmetric (int8 kernel); 4: grouped (int4 kernel)")
    group_size: GroupSize = Field("channel", description='input columns per scale for 4-bit (e.g. 64), or "channel"')
    symmetric: bool = True

    @model_validator(mode="after")
    def _kernel_grid(self):
        if self.group_size == "tensor":
            raise ValueError('quantize_head scales per channel or per group: use "channel" or an integer group_size')
        return self

    @property
    def needs_calibration(self) -> bool:
        return False

    def check(self, adapter, layers: dict[str, int]) -> None:
        width = adapter.lm_head.weight.shape[1] if hasattr(adapter.lm_head, "weight") else None
        if width is None:
            raise SlimlmError("quantize_head: the model's LM head is not a plain linear (already quantized?)")
        if isinstance(self.group_size, int) and self.group_size > width:
            raise SlimlmError(f"quantize_head: group_size {self.group_size} is larger than the head's {width} inputs")

    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        start = time.perf_counter()
        group = self.group_size if isinstance(self.group_size, int) else None
        quantize_lm_head_(context.model, self.bits, group, self.symmetric)
        report.layers.append(LayerReport("lm_head", self.method, time.perf_counter() - start))
