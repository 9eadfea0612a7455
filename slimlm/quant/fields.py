"""Settings that the quantization methods share: the weight grid, the activation grid, and both together.

Each method's stage class (in its own file) inherits the groups it takes, so a field, its default, its
range check and its error message live once.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from slimlm.core.stage import StrictModel
from slimlm.errors import SlimlmError
from slimlm.quant.activation import check_activation_settings
from slimlm.quant.grid import check_format

GroupSize = Union[int, Literal["channel", "tensor"]]


class ClipField(StrictModel):
    """How the weight grid's range is chosen (`slimlm.quant.grid`): min-max, the MSE-optimal shrink, or
    llama.cpp's Q4_0 / Q5_0 signed-max rule (symmetric integer grids; weights only)."""

    clip: Literal["minmax", "mse", "signed_max", "weighted_lsq"] = Field(
        "minmax", description='"minmax", "mse" (shrink search), "signed_max" (llama.cpp Q4_0 rule, symmetric) or '
                              '"weighted_lsq" (llama.cpp\'s importance-weighted scale search, symmetric)')

    @model_validator(mode="after")
    def _signed_max_grid(self):
        if self.clip not in ("signed_max", "weighted_lsq"):
            return self
        if not getattr(self, "symmetric", False) or getattr(self, "fmt", "int") != "int":
            raise ValueError(f'clip "{self.clip}" (a llama.cpp Q4_0 rule) needs an integer grid with symmetric: true')
        if getattr(self, "activations", None) is not None:
            raise ValueError(f'clip "{self.clip}" is a weight rule; quantize activations with clip "minmax" or "mse"')
        return self


class WeightQuantFields(StrictModel):
    bits: int = Field(4, description="weight bits, 2 to 8")
    group_size: GroupSize = Field(128, description='input columns per scale, or "channel" / "tensor"')
    symmetric: bool = False
    partial_last_group: bool = Field(
        True, description="allow a group size that does not divide in_features (shorter last group)"
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, bits: int) -> int:
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be between 2 and 8 (got {bits})")
        return bits

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, group_size: GroupSize) -> GroupSize:
        if isinstance(group_size, int) and group_size < 1:
            raise ValueError(f'group_size must be a positive integer, "channel" or "tensor" (got {group_size})')
        return group_size

    @property
    def granularity(self) -> str:
        return "group" if isinstance(self.group_size, int) else self.group_size

    @property
    def int8_channel_grid(self) -> bool:
        """8-bit symmetric per-channel integer weights: the grid the int8 GEMM (`Int8Linear`) multiplies."""
        return (self.bits, self.group_size, self.symmetric, getattr(self, "fmt", "int")) == (8, "channel", True, "int")

    @property
    def group_columns(self) -> int | None:
        """Columns per group, or None for per-channel and per-tensor scales."""
        return self.group_size if isinstance(self.group_size, int) else None

    def check_layer(self, name: str, in_features: int) -> None:
        """Fail before any work if this layer's width does not fit the grouping."""
        size = self.group_columns
        if size is None:
            return
        if size > in_features:
            raise SlimlmError(f"group_size {size} is larger than {name}'s {in_features} input features")
        if in_features % size and not self.partial_last_group:
            raise SlimlmError(
                f"group_size {size} does not divide {name}'s {in_features} input features; pick a divisor "
                f"(e.g. {_largest_divisor(in_features, size)}) or set partial_last_group: true"
            )


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


class ActivationQuantConfig(StrictModel):
    """Integer quantization of the linears' inputs (W8A8, `slimlm.quant.activation`)."""

    bits: int = Field(8, description="activation bits, 2 to 8 (codes are multiplied as int8)")
    granularity: Literal["per_token", "per_tensor"] = Field(
        "per_token", description="per_token: dynamic, a range per token at run time; per_tensor: static, calibrated")
    symmetric: bool = True
    outlier_threshold: float | None = Field(
        None, description="LLM.int8(): input columns with any |x| >= this go through a float16-weight path "
        "(the paper: 6.0; needs per_token)")
    fmt: Literal["int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"] = Field(
        "int", description="the activation grid: integer, or a floating-point format (symmetric, bits 8 / 4)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, bits: int) -> int:
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be between 2 and 8 (got {bits}); codes are multiplied as int8")
        return bits

    @field_validator("outlier_threshold")
    @classmethod
    def _outlier_threshold(cls, threshold: float | None) -> float | None:
        if threshold is not None and not threshold > 0:  # NaN fails too
            raise ValueError(f"outlier_threshold must be a positive number (got {threshold}); LLM.int8() uses 6.0")
        return threshold

    @model_validator(mode="after")
    def _outliers_per_token(self):
        if self.outlier_threshold is not None and self.granularity != "per_token":
            raise ValueError("outlier_threshold (LLM.int8()) finds outlier columns per call: it needs "
                             "granularity: per_token (a static per_tensor range would still hold the outliers)")
        return self

    @model_validator(mode="after")
    def _format(self):
        try:
            check_activation_settings(self.bits, self.granularity, self.fmt, self.symmetric)
        except SlimlmError as error:
            raise ValueError(str(error)) from None
        if self.fmt != "int" and self.outlier_threshold is not None:
            raise ValueError("outlier_threshold (LLM.int8()) belongs to the int8 grid; drop it for fmt " + self.fmt)
        return self


class WeightActivationFields(WeightQuantFields):
    """Weights and (optionally) inputs quantized together: 8-bit symmetric per-channel integer weights with
    integer activations run the int8 GEMM (`Int8Linear`); other combinations are simulated."""

    fmt: Literal["int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"] = Field(
        "int", description="the weight grid: integer, or a floating-point format (symmetric; bits 8 or 4)")

    @model_validator(mode="after")
    def _weight_format(self):
        try:
            check_format(self.bits, self.fmt)
        except SlimlmError as error:
            raise ValueError(str(error)) from None
        if self.fmt != "int" and not self.symmetric:
            raise ValueError(f"{self.fmt} is a symmetric grid (zero point 0); set symmetric: true")
        return self

    def check_outlier_path(self, activations: ActivationQuantConfig | None) -> None:
        if activations is not None and activations.outlier_threshold is not None and not self.int8_channel_grid:
            raise ValueError("outlier_threshold (LLM.int8()) runs the int8 GEMM: it needs bits: 8, group_size: "
                             f"channel, symmetric: true (got bits: {self.bits}, group_size: {self.group_size}, "
                             f"symmetric: {self.symmetric}, fmt: {self.fmt})")
