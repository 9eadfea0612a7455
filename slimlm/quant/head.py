"""Quantize the LM head (round to nearest): the largest single matrix a small model reads per token.

SmolLM2-135M's head is 49152 x 576 (tied to the embedding): 113 MB in float32, two thirds of the bytes a
W4 g64 model reads per generated token when the head stays float. Stored as 8-bit per-channel symmetric
codes it runs through the int8 packed kernel, as 4-bit grouped codes through the int4 kernel
(`slimlm.quant.qlinear`), during generation on CPUs where those kernels are fast.

A tied head is untied: the embedding keeps its float weights (a lookup reads one row per token, so it
costs memory, not decode time) and the head gets its own quantized copy. With `embedding: true` the
embedding is quantized too (`slimlm.quant.qembedding`): on a tied model it reads the quantized head's
own tensors, so the file holds the matrix once, in its quantized form (SmolLM2-135M: the W4 g64
file with an 8-bit tied head and embedding is 0.16x the float32 file, against 0.21x with a bfloat16
embedding); an untied embedding gets its own codes on the same grid. The quality cost is measured
like any method's (`benchmarks/deploy.py`: perplexity and KL to float32).
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from slimlm.core.blocks import CompressionReport, LayerReport
from slimlm.core.stage import ModelContext, Stage, register
from slimlm.errors import SlimlmError
from slimlm.quant.fields import GroupSize
from slimlm.quant.grid import quantize_weight
from slimlm.quant.qembedding import QuantizedEmbedding
from slimlm.quant.qlinear import QuantizedLinear


def quantize_lm_head_(model, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                      embedding: bool = False) -> QuantizedLinear:
    """Replace `model`'s output embedding by a QuantizedLinear (RTN); returns it. Unties a tied head; with
    `embedding`, quantizes the input embedding too (sharing the head's tensors when they were tied)."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, QuantizedLinear):
        raise SlimlmError("the LM head is already quantized")
    if head is None or not hasattr(head, "weight") or head.weight.dim() != 2:
        raise SlimlmError(f"{type(model).__name__} has no linear LM head to quantize")
    if embedding and not isinstance(getattr(table, "weight", None), torch.Tensor):
        raise SlimlmError(f"{type(model).__name__}'s input embedding has no plain weight to quantize")
    tied = head.weight is getattr(table, "weight", None)
    quantized = quantize_weight(head.weight.detach().float(), bits, group_size, symmetric)
    layer = QuantizedLinear.replacing(head, quantized)
    model.set_output_embeddings(layer)
    model.config.tie_word_embeddings = False  # a rebuilt model must not tie the embedding to this layer
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False
    if embedding:
        model.set_input_embeddings(_quantized_embedding(model, table, layer, tied, bits, group_size, symmetric))
    return layer


def _quantized_embedding(model, table, head: QuantizedLinear, tied: bool, bits: int, group_size: int | None,
                         symmetric: bool) -> QuantizedEmbedding:
    if tied:
        head_name = next(name for name, module in model.named_modules() if module is head)
        return QuantizedEmbedding.sharing(head, table, head_name)
    quantized = quantize_weight(table.weight.detach().float(), bits, group_size, symmetric)
    return QuantizedEmbedding.replacing_embedding(table, quantized)


@register
class QuantizeHeadStage(Stage):
    """Round-to-nearest quantization of the LM head (8-bit per channel, or 4-bit grouped)."""

    method: Literal["quantize_head"] = "quantize_head"
    whole_model: ClassVar[bool] = True  # the head is outside the blocks: done once, before the block pass
    bits: Literal[4, 8] = Field(8, description="8: per-channel symmetric (int8 kernel); 4: grouped (int4 kernel)")
    group_size: GroupSize = Field("channel", description='input columns per scale for 4-bit (e.g. 64), or "channel"')
    symmetric: bool = True
    embedding: bool = Field(False, description="quantize the input embedding too, on the same grid "
                            "(a tied embedding shares the head's codes: the file holds the matrix once)")

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
        quantize_lm_head_(context.model, self.bits, group, self.symmetric, self.embedding)
        report.layers.append(LayerReport("lm_head", self.method, time.perf_counter() - start))
