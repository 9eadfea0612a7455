"""LLM.int8(): vector-wise int8 matrix multiplication with a mixed-precision decomposition for outliers.

Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for Transformers
at Scale", NeurIPS 2022 (arXiv:2208.07339), Sec. 3.2-3.3. For an input X (tokens, in) and a weight
W (out, in):

- vector-wise quantization (Sec. 3.2): an absmax scale per row of X (per token) and per row of W
  (per output channel), int8 x int8 -> int32 products rescaled by the outer product of the scales:
  exactly `Int8Linear` with dynamic per-token symmetric activations;
- mixed-precision decomposition (Sec. 3.3): the set O = { j : max_t |X_tj| >= threshold } of input
  feature columns holding an outlier (threshold alpha = 6.0 in the paper) is found on every call,
  and

      Y = X[:, O] W[:, O]^T  (floating point)  +  Q(X[:, ~O]) Q(W[:, ~O])^T  (int8 GEMM)

  The int8 part runs on X with the outlier columns set to zero, so neither the per-token scales
  nor the products see them; the codes of W are quantized once over all columns (the zeroed
  columns contribute nothing), as bitsandbytes does.

Storage: the float path needs W's columns for whatever features turn out to be outliers at run
time, so the layer keeps the whole weight in float16 (`weight_fp16`, (out, in)), as the paper's
fp16 model and bitsandbytes' `has_fp16_weights` mode do, beside the int8 codes and per-channel
float32 scales of the int8 path. That is 3 bytes per weight plus 4 bytes per output channel (and
the bias): *more* than the float16 layer alone (2 bytes per weight). This layer buys int8
arithmetic with float16-like accuracy, not memory; for memory use `Int8Linear` (1 byte per weight).
Deviations: the float part is computed in float32 from the float16 weights and the input's values
(the paper multiplies in float16); the int8 codes come from the float32 weight, not from its
float16 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimlm.core.registry import register_layer
from slimlm.errors import SlimlmError
from slimlm.quant.w8a8 import Int8Linear

DEFAULT_THRESHOLD = 6.0


def check_outlier_threshold(threshold: float) -> float:
    """The threshold as a float, or SlimlmError unless it is a positive number (inf: no decomposition)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:  # NaN too
        raise SlimlmError(f"LLM.int8() outlier_threshold must be a positive number (got {threshold!r}); the paper "
                          "uses 6.0, and inf turns the float decomposition off")
    return float(threshold)


@register_layer("llm_int8")
class LLMInt8Linear(Int8Linear):
    """`Int8Linear` plus the float path for outlier feature columns; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, activation_bits: int = 8,
                 granularity: str = "per_token", activation_symmetric: bool = True,
                 outlier_threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__(in_features, out_features, activation_bits, granularity, activation_symmetric)
        self.outlier_threshold = check_outlier_threshold(outlier_threshold)
        self.last_outlier_columns = torch.empty(0, dtype=torch.long)  # input columns the latest call sent to float
        self.register_buffer("weight_fp16", torch.zeros(out_features, in_features, dtype=torch.float16))

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, activation_bits: int = 8,
                   granularity: str = "per_token", activation_symmetric: bool = True, clip: str = "minmax",
                   outlier_threshold: float = DEFAULT_THRESHOLD) -> LLMInt8Linear:
        threshold = check_outlier_threshold(outlier_threshold)
        weight_fp16 = weight.detach().to(torch.float16)
        if not bool(torch.isfinite(weight_fp16).all()):
            raise SlimlmError("LLM.int8() keeps the weight in float16, which cannot hold this weight "
                              f"(|w| up to {float(weight.detach().abs().max()):g}; float16 ends at 65504)")
        layer = super().from_float(weight, bias, activation_bits, granularity, activation_symmetric, clip)
        layer.outlier_threshold = threshold
        layer.weight_fp16 = weight_fp16.clone()
        return layer

    @classmethod
    def empty(cls, meta: dict) -> LLMInt8Linear:
        layer = super().empty(meta)
        if "outlier_threshold" not in meta:
            raise SlimlmError("LLM.int8() layer metadata lacks 'outlier_threshold'; re-save the model with "
                              "LLMInt8Linear.meta()")
        layer.outlier_threshold = check_outlier_threshold(meta["outlier_threshold"])
        return layer

    def meta(self) -> dict:
        return {**super().meta(), "kind": "llm_int8", "outlier_threshold": self.outlier_threshold,
                "outlier_weights": "float16"}

    def outlier_columns(self, rows: Tensor) -> Tensor:
        """Indices j with max_t |X_tj| >= threshold in a (tokens, in) input (none for an infinite threshold)."""
        if math.isinf(self.outlier_threshold) or rows.numel() == 0:
            return torch.empty(0, dtype=torch.long, device=rows.device)
        return torch.nonzero(rows.abs().amax(dim=0) >= self.outlier_threshold).reshape(-1)

    def _product(self, rows: Tensor, int8: bool) -> Tensor:
        columns = self.outlier_columns(rows)
        self.last_outlier_columns = columns
        if columns.numel() == 0:
            return super()._product(rows, int8)
        y = super()._product(rows.index_fill(1, columns, 0), int8)
        return y.addmm_(rows[:, columns].float(), self.weight_fp16[:, columns].float().t())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, outlier_threshold={self.outlier_threshold:g} "
                "(outlier columns in float from float16 weights)")
