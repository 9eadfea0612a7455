"""Recipes: typed, validated descriptions of a compression run, in Python or YAML.

A recipe is a list of stages and a calibration set. Each stage names a method, its settings and
its targets (module-name patterns; `re:` prefix for a regular expression, else a glob) and an
ignore list. Every model rejects unknown keys, and the error lists the valid ones, so a typo in
a recipe fails before any work:

```yaml
calibration: {corpus: c4, samples: 128, seqlen: 512, seed: 0}
stages:
  - method: gptq
    bits: 4
    group_size: 64
    act_order: true
    ignore: [lm_head]
```

Stages run in order; methods that calibrate run inside the same sequential block-by-block pass
(see `slimlm.compress.engine`).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimlm.compress.sparsity import parse_n_m
from slimlm.errors import SlimlmError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CalibrationConfig(StrictModel):
    corpus: str = "c4"  # a corpus name (its calibration split) or a .txt/.jsonl path
    samples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="calibration segments per forward pass")


class StageBase(StrictModel):
    structural: ClassVar[bool] = False  # True: changes the architecture, runs before the block pass
    targets: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @property
    def needs_calibration(self) -> bool:
        return True


GroupSize = Union[int, Literal["channel", "tensor"]]


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
        from slimlm.quant.activation import check_activation_settings

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
        from slimlm.quant.grid import check_format

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


class RTNStage(StageBase, WeightActivationFields):
    """Round-to-nearest weight quantization (data-free baseline); with `activations`, the inputs too (W8A8
    with an integer GEMM; W4A8, W6A6, W4A4 and FP8 simulated)."""

    method: Literal["rtn"] = "rtn"
    clip: Literal["minmax", "mse"] = "minmax"
    activations: ActivationQuantConfig | None = Field(
        None, description="also quantize the inputs (8-bit symmetric per-channel weights: an integer GEMM)")

    @model_validator(mode="after")
    def _outliers(self):
        self.check_outlier_path(self.activations)
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None and self.activations.granularity == "per_tensor"


class SmoothQuantStage(StageBase, WeightActivationFields):
    """SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights, then W8A8 (`Int8Linear`;
    other weight / activation bits simulated)."""

    method: Literal["smoothquant"] = "smoothquant"
    bits: int = Field(8, description="weight bits, 2 to 8")
    group_size: GroupSize = Field("channel", description='input columns per scale, or "channel" / "tensor"')
    symmetric: bool = True
    alpha: float = Field(0.5, description="migration strength in [0, 1]: s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)")
    alpha_grid: list[float] | None = Field(
        None, description="search alpha per block among these values (e.g. [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]) by the "
        "mean squared error of the quantized block's output against the float block; replaces `alpha`")
    activations: ActivationQuantConfig = Field(default_factory=ActivationQuantConfig,
                                               description="the activation grid (default: 8-bit per-token dynamic)")
    clip: Literal["minmax", "mse"] = Field("minmax", description="the int8 weight grid's range")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, alpha: float) -> float:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (got {alpha}); the paper uses 0.5 for most models")
        return alpha

    @field_validator("alpha_grid")
    @classmethod
    def _alpha_grid(cls, grid: list[float] | None) -> list[float] | None:
        if grid is not None:
            if not grid:
                raise ValueError("alpha_grid is empty: give values in [0, 1], e.g. [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]")
            bad = [a for a in grid if not 0 <= a <= 1]
            if bad:
                raise ValueError(f"alpha_grid values must be in [0, 1] (got {bad})")
        return grid

    @model_validator(mode="after")
    def _no_outlier_decomposition(self):
        if self.activations.outlier_threshold is not None:
            raise ValueError("outlier_threshold (LLM.int8()) is a setting of the rtn stage; SmoothQuant removes "
                             "the outliers by smoothing instead")
        return self


class LKDConfig(StrictModel):
    """ZeroQuant's layer-by-layer knowledge distillation: each quantized block is trained to match the float block."""

    epochs: int = Field(2, ge=1, description="passes over the calibration batches per block")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the block's weights")


class ZeroQuantStage(StageBase, WeightQuantFields):
    """ZeroQuant (Yao et al., NeurIPS 2022): group-wise weights, token-wise dynamic activations, optional LKD."""

    method: Literal["zeroquant"] = "zeroquant"
    bits: int = Field(8, description="weight bits of the MLP linears (2 to 8)")
    attention_bits: int | None = Field(
        None, description="weight bits of the attention linears (default: `bits`; the paper's W4/8-A8: 8)")
    group_size: GroupSize = Field(64, description='input columns per weight scale, or "channel" / "tensor"')
    symmetric: bool = True
    activations: ActivationQuantConfig = Field(default_factory=ActivationQuantConfig,
                                               description="the activation grid (default: 8-bit per-token dynamic)")
    lkd: LKDConfig | None = Field(None, description="layer-by-layer knowledge distillation (needs calibration data)")

    @field_validator("attention_bits")
    @classmethod
    def _attention_bits(cls, bits: int | None) -> int | None:
        if bits is not None and not 2 <= bits <= 8:
            raise ValueError(f"attention_bits must be between 2 and 8 (got {bits})")
        return bits

    @model_validator(mode="after")
    def _token_wise(self):
        if self.activations.granularity != "per_token" or self.activations.outlier_threshold is not None \
                or self.activations.fmt != "int":
            raise ValueError("ZeroQuant quantizes activations token-wise on a dynamic integer grid: use "
                             "activations: {granularity: per_token} without outlier_threshold or fmt")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.lkd is not None


class GPTQStage(StageBase, WeightQuantFields):
    """GPTQ (Frantar et al., 2023)."""

    method: Literal["gptq"] = "gptq"
    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of the mean Hessian diagonal added")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    clip: Literal["minmax", "mse"] = "minmax"


class AWQStage(StageBase, WeightQuantFields):
    """AWQ (Lin et al., 2024)."""

    method: Literal["awq"] = "awq"
    grid: int = Field(20, ge=2, description="alpha grid points in [0, 1]")
    clip_search: bool = True
    clip_grid: int = Field(20, ge=2)
    max_shrink: float = Field(0.5, gt=0, lt=1)
    clip_tokens: int = Field(512, ge=16, description="input tokens sampled for the clipping search")
    search_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="precision of the scale search's forward passes (the reference code runs float16)")

    @field_validator("group_size")
    @classmethod
    def _not_per_tensor(cls, group_size: GroupSize) -> GroupSize:
        if group_size == "tensor":
            raise ValueError('AWQ scales per group or per channel: use an integer group_size or "channel"')
        return group_size


class OmniQuantStage(StageBase, WeightQuantFields):
    """OmniQuant (Shao et al., ICLR 2024): learnable weight clipping (LWC) and learnable equivalent
    transformation (LET), trained block by block (`slimlm.quant.omniquant`)."""

    method: Literal["omniquant"] = "omniquant"
    group_size: GroupSize = Field("channel", description='input columns per scale, or "channel" (the paper\'s default)')
    activations: ActivationQuantConfig | None = Field(
        None, description="also quantize the linears' inputs (the paper: per-token dynamic asymmetric, W4A4 / W6A6); "
        "None: weight-only")
    lwc: bool = Field(True, description="learn each weight group's clipping range (Eq. 2)")
    let: bool = Field(True, description="learn channel scales (and, with activations, shifts) of the linears after "
                      "each norm (Eq. 3-4); the paper uses it for weight-activation quantization")
    epochs: int = Field(20, description="passes over the calibration segments per block (the paper: 20 for W4A4/W6A6)")
    lwc_lr: float = Field(1e-2, description="AdamW learning rate of the clipping parameters")
    let_lr: float = Field(5e-3, description="AdamW learning rate of the scales and shifts")
    batch_size: int = Field(1, description="calibration segments per optimisation step (the paper: 1)")
    alpha: float = Field(0.5, description="migration strength of the SmoothQuant-style initial scales")
    aug_loss: bool = Field(False, description="add the error against the float block on the same (quantized) inputs "
                           "(the reference's --aug_loss)")

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, epochs: int) -> int:
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1 (got {epochs}); OmniQuant trains each block (the paper: 20)")
        return epochs

    @field_validator("lwc_lr", "let_lr")
    @classmethod
    def _learning_rate(cls, lr: float) -> float:
        if not lr > 0:  # NaN fails too
            raise ValueError(f"learning rates must be positive (got {lr}); the paper uses lwc_lr 1e-2, let_lr 5e-3")
        return lr

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, batch_size: int) -> int:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        return batch_size

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, alpha: float) -> float:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (got {alpha}); the reference initialises with 0.5")
        return alpha

    @field_validator("group_size")
    @classmethod
    def _not_per_tensor(cls, group_size: GroupSize) -> GroupSize:
        if group_size == "tensor":
            raise ValueError('LWC learns a range per output channel or group: use an integer group_size or "channel"')
        return group_size

    @model_validator(mode="after")
    def _settings(self):
        if not (self.lwc or self.let):
            raise ValueError("lwc and let are both off: there is nothing to learn (use the rtn method)")
        acts = self.activations
        if acts is not None:
            if acts.outlier_threshold is not None:
                raise ValueError("outlier_threshold (LLM.int8()) is a setting of the rtn stage; OmniQuant's LET "
                                 "handles the outliers instead")
            if acts.granularity != "per_token" or getattr(acts, "fmt", "int") != "int":
                raise ValueError("OmniQuant quantizes activations per token on a dynamic integer grid, as the paper "
                                 "does: set activations.granularity: per_token (and fmt: int)")
        return self


class LLMFP4Stage(StageBase):
    """LLM-FP4 (Liu et al., EMNLP 2023): FP4 W4A4 with a joint format / maximum-value search and per-channel
    pre-shifted activation exponent biases folded into the weights (`slimlm.quant.llm_fp4`)."""

    method: Literal["llm_fp4"] = "llm_fp4"
    weight_format: Literal["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"] = Field(
        "fp4_e2m1", description="the weights' 4-bit FP format (the search's start when search_formats)")
    search_formats: bool = Field(True, description="search the exponent / mantissa split (E1M2, E2M1, E3M0) by the "
                                 "layer output error (activations: the FP4 formats the activation grid holds)")
    max_grid: int = Field(20, description="candidate maximum values per format, evenly spaced in "
                          "[min_fraction, 1] x absmax")
    min_fraction: float = Field(0.3, description="the smallest candidate maximum as a fraction of absmax")
    exponent_bias: bool = Field(True, description="per-channel pre-shifted exponent bias of the activations "
                                "(powers of two folded into the weight columns); false: per-tensor only")
    max_shift: int | None = Field(None, description="largest per-channel shift |rho_j| (None: 2^E - 1, the "
                                  "reference's clamp)")
    search_tokens: int = Field(256, description="calibration tokens sampled per linear for the search")
    search_rounds: int = Field(1, description="alternating weight / activation search rounds (the reference: 3)")

    @field_validator("max_grid")
    @classmethod
    def _max_grid(cls, grid: int) -> int:
        if grid < 2:
            raise ValueError(f"max_grid must be at least 2 (got {grid}): absmax and at least one smaller maximum")
        return grid

    @field_validator("min_fraction")
    @classmethod
    def _min_fraction(cls, fraction: float) -> float:
        if not 0 < fraction < 1:  # NaN fails too
            raise ValueError(f"min_fraction must be in (0, 1) (got {fraction}); e.g. 0.3")
        return fraction

    @field_validator("max_shift")
    @classmethod
    def _max_shift(cls, shift: int | None) -> int | None:
        if shift is not None and not 0 <= shift <= 30:
            raise ValueError(f"max_shift must be between 0 and 30 (got {shift}); None uses 2^E - 1")
        return shift

    @field_validator("search_tokens")
    @classmethod
    def _search_tokens(cls, tokens: int) -> int:
        if tokens < 16:
            raise ValueError(f"search_tokens must be at least 16 (got {tokens})")
        return tokens

    @field_validator("search_rounds")
    @classmethod
    def _search_rounds(cls, rounds: int) -> int:
        if rounds < 1:
            raise ValueError(f"search_rounds must be at least 1 (got {rounds})")
        return rounds


class OWLConfig(StrictModel):
    """OWL (Yin et al., 2024): non-uniform sparsity per block from its share of outlier scores."""

    lam: float = Field(0.08, gt=0, lt=1, description="block sparsities span target - lam .. target + lam")
    outlier_multiple: float = Field(5.0, gt=0, description="an outlier is a Wanda score above this many times the block mean")


class PruneFields(StrictModel):
    sparsity: float = Field(0.5, description="fraction of each target's weights set to zero, in (0, 1)")
    pattern: str | None = Field(None, description='N:M semi-structured sparsity, e.g. "2:4" (keep 2 of every 4)')
    owl: OWLConfig | None = None

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, sparsity: float) -> float:
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be between 0 and 1, exclusive (got {sparsity}); 0.5 prunes half the weights")
        return sparsity

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                parse_n_m(pattern)
            except SlimlmError as error:
                raise ValueError(str(error)) from None
        return pattern

    @model_validator(mode="after")
    def _pattern_fixes_sparsity(self):
        if self.pattern is not None:
            if self.owl is not None:
                raise ValueError("OWL varies the sparsity per block; an N:M pattern fixes it: use one or the other")
            n, m = self.n_m
            if "sparsity" in self.model_fields_set and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern} means sparsity {1 - n / m:g}, not {self.sparsity:g}: drop `sparsity`")
            object.__setattr__(self, "sparsity", 1 - n / m)  # what the pattern means, for reports
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_n_m(self.pattern) if self.pattern else None

    def check_layer(self, name: str, in_features: int) -> None:
        if self.n_m and in_features % self.n_m[1]:
            raise SlimlmError(f"pattern {self.pattern}: {name}'s {in_features} input features are not a multiple of "
                              f"{self.n_m[1]}; exclude it with `ignore`")


class MagnitudeStage(StageBase, PruneFields):
    """Magnitude pruning: the smallest |W_ij| go (per layer, or per output row as Wanda's ablation)."""

    method: Literal["magnitude"] = "magnitude"
    scope: Literal["layer", "row"] = "layer"

    @property
    def needs_calibration(self) -> bool:
        return self.owl is not None


class WandaStage(StageBase, PruneFields):
    """Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2 compared within each output row."""

    method: Literal["wanda"] = "wanda"


class JointQuantization(WeightQuantFields):
    """SparseGPT's joint mode: quantize the kept weights in the same sweep."""

    clip: Literal["minmax", "mse"] = "minmax"


class SparseGPTStage(StageBase, PruneFields):
    """SparseGPT (Frantar and Alistarh, 2023)."""

    method: Literal["sparsegpt"] = "sparsegpt"
    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of the mean Hessian diagonal added")
    block_size: int = Field(128, ge=1, description="columns per adaptive mask block and lazy update")
    quantize: JointQuantization | None = Field(None, description="quantize in the same sweep (bits, group_size, ...)")

    def check_layer(self, name: str, in_features: int) -> None:
        PruneFields.check_layer(self, name, in_features)
        if self.n_m and self.block_size % self.n_m[1]:
            raise SlimlmError(f"block_size {self.block_size} must be a multiple of M = {self.n_m[1]}")
        if self.quantize is not None:
            self.quantize.check_layer(name, in_features)


class DSnoTStage(StageBase, PruneFields):
    """DSnoT (Zhang et al., 2024): training-free prune-and-grow on top of an initial mask."""

    method: Literal["dsnot"] = "dsnot"
    initial: Literal["wanda", "sparsegpt", "magnitude"] = "wanda"
    max_cycles: int = Field(50, ge=1)
    update_threshold: float = Field(0.1, ge=0, description="stop a row once |reconstruction error| is this small")
    variance_power: float = Field(1.0, ge=0, description="regrowing score divided by var(X_j)^power")
    skip_roles: list[str] = Field(default_factory=lambda: ["gate", "up", "down"],
                                  description="linears that keep the initial mask (the reference skips the MLP)")
    same_sign: bool | None = Field(None, description="stop a row when its error would change sign "
                                   "(default: as the reference, only for N:M)")
    dampening: float = Field(0.01, gt=0, lt=1, description="for initial: sparsegpt, the Hessian dampening")


class DropLayersStage(StageBase):
    """Layer removal: the least important blocks go (ShortGPT's angular criterion or Shortened LLaMA's perplexity)."""

    method: Literal["drop_layers"] = "drop_layers"
    structural: ClassVar[bool] = True  # changes the architecture: runs before the block-by-block pass
    count: int | None = Field(None, ge=1, description="blocks to remove")
    ratio: float | None = Field(None, gt=0, lt=1, description="or: the fraction of blocks to remove")
    criterion: Literal["angular", "perplexity"] = "angular"

    @model_validator(mode="after")
    def _count_or_ratio(self):
        if (self.count is None) == (self.ratio is None):
            raise ValueError("give exactly one of `count` (blocks to remove) and `ratio` (fraction of blocks)")
        return self

    def check_model(self, adapter) -> None:
        self.blocks_to_remove(len(adapter))

    def blocks_to_remove(self, blocks: int) -> int:
        count = self.count if self.count is not None else round(self.ratio * blocks)
        if not 1 <= count < blocks:
            raise SlimlmError(f"drop_layers: cannot remove {count} of the model's {blocks} blocks; "
                              f"choose 1 to {blocks - 1}")
        return count


class LoRARecovery(StrictModel):
    """LoRA fine-tuning after structural pruning, on the calibration segments."""

    steps: int = Field(100, ge=1)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)


def require_separate_projections(adapter, method: str) -> None:
    """Structured pruning that cuts heads and channels needs separate q/k/v/o and up/down linears."""
    roles = set(adapter[0].linears)
    if not {"q", "k", "v", "o", "up", "down"} <= roles:
        raise SlimlmError(f"{method} needs separate q/k/v/o and up/down projections; this {adapter.family} "
                          f"model has {sorted(roles)} (fused qkv is not supported)")


class LLMPrunerStage(StageBase):
    """LLM-Pruner (Ma et al., 2023): coupled attention groups and MLP channels by first-order Taylor importance."""

    method: Literal["llm_pruner"] = "llm_pruner"
    structural: ClassVar[bool] = True
    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of each block's KV-head groups and MLP channels removed")
    importance: Literal["element", "vector"] = "element"
    aggregation: Literal["sum", "mean", "max", "prod"] = "sum"
    attention_unit: Literal["kv_group", "query_head"] = Field(
        "kv_group", description="remove whole KV groups, or query heads (the same number in every group)")
    gradient_samples: int = Field(10, ge=1, description="calibration segments for the gradients (the paper: 10)")
    recovery: LoRARecovery | None = None

    def check_model(self, adapter) -> None:
        require_separate_projections(adapter, self.method)


class SliceGPTStage(StageBase):
    """SliceGPT (Ashkboos et al., 2024): rotate the residual stream onto its principal axes, delete the weakest."""

    method: Literal["slicegpt"] = "slicegpt"
    structural: ClassVar[bool] = True
    slicing: float | None = Field(None, ge=0, lt=1, description="fraction of the hidden size deleted")
    parameter_reduction: float | None = Field(
        None, gt=0, lt=1, description="or: the fraction of the model's parameters to remove (the closest width is chosen)")
    round_to: int = Field(8, ge=1, description="the new hidden size is a multiple of this (and of what the config demands)")
    dampening: float = Field(0.01, ge=0, lt=1, description="fraction of the mean covariance diagonal added before PCA")
    rotation: Literal["per_block", "global"] = Field(
        "global", description="one rotation for all blocks (a plain transformers model; the default), or the "
        "paper's rotation per block (shortcut matrices on the residual connections: a slimlm checkpoint)")

    @model_validator(mode="after")
    def _slicing_or_reduction(self):
        if (self.slicing is None) == (self.parameter_reduction is None):
            raise ValueError("give exactly one of `slicing` (fraction of the hidden size) and `parameter_reduction`")
        return self

    def check_model(self, adapter) -> None:
        from slimlm.prune.slicegpt import check_slicegpt_model

        check_slicegpt_model(adapter)


class FLAPStage(StageBase):
    """FLAP (An et al., 2024): fluctuation-based structured pruning with bias compensation."""

    method: Literal["flap"] = "flap"
    structural: ClassVar[bool] = True
    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of the blocks' attention and MLP parameters removed")
    metric: Literal["WIFV", "IFV", "WIFN"] = Field("WIFV", description="the paper's fluctuation metric, or its ablations")
    structure: Literal["AL-AM", "UL-UM"] = Field(
        "UL-UM", description="the same fraction in every block and module (equal blocks: plain transformers loads "
        "them; the default), or the paper's adaptive widths across blocks and modules (a slimlm checkpoint)")
    bias_compensation: bool = True

    def check_model(self, adapter) -> None:
        require_separate_projections(adapter, self.method)


_STAGES = (RTNStage, SmoothQuantStage, ZeroQuantStage, GPTQStage, AWQStage, OmniQuantStage, LLMFP4Stage, MagnitudeStage, WandaStage, SparseGPTStage, DSnoTStage, DropLayersStage,
           LLMPrunerStage, SliceGPTStage, FLAPStage)
Stage = Annotated[Union[_STAGES], Field(discriminator="method")]
STAGE_CLASSES = {cls.model_fields["method"].default: cls for cls in _STAGES}
METHODS = tuple(STAGE_CLASSES)


class Recipe(StrictModel):
    stages: list[Stage] = Field(min_length=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    # Precision of the parameters no stage compresses (embedding, norms, LM head): rounded in memory
    # after compression, so the saved checkpoint stores them in that dtype and is still exactly the
    # model that was evaluated.
    float_storage: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def needs_calibration(self) -> bool:
        return any(stage.needs_calibration for stage in self.stages)

    @model_validator(mode="after")
    def _structural_first(self):
        seen_block_stage = False
        for stage in self.stages:
            if stage.structural and seen_block_stage:
                raise ValueError(f"stage {stage.method!r} changes the architecture: put it before the "
                                 "pruning and quantization stages")
            seen_block_stage |= not stage.structural
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_recipe(data: dict) -> Recipe:
    """Validate a recipe dict; errors name each bad field and list the valid keys."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise SlimlmError("invalid recipe:\n" + _explain(error, data)) from None


def _explain(error: ValidationError, data: dict) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(item["loc"], data)
            message = f"unknown key {item['loc'][-1]!r}" + (f"; valid keys: {', '.join(valid)}" if valid else "")
            if item["loc"][-1] == "activations":
                message += ("; activation quantization (W8A8) is a setting of the rtn stage only "
                            "(and of smoothquant, which always quantizes activations)")
        elif item["type"] == "union_tag_invalid":
            message = f"unknown method {item['input'].get('method') if isinstance(item['input'], dict) else item['input']!r}; choose one of {', '.join(METHODS)}"
        elif item["type"] == "union_tag_not_found":
            message = f"a stage needs a `method` ({', '.join(METHODS)})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _valid_keys(loc: tuple, data: dict) -> list[str]:
    """Field names of the model at `loc` (without its last element, the bad key)."""
    if loc[0] == "stages" and len(loc) >= 4:
        method = loc[2]
        model = STAGE_CLASSES.get(str(method))
        if model in (RTNStage, SmoothQuantStage, ZeroQuantStage, OmniQuantStage) and len(loc) >= 5 and loc[3] == "activations":
            model = ActivationQuantConfig
        return sorted(model.model_fields) if model else []
    if loc[0] == "calibration":
        return sorted(CalibrationConfig.model_fields)
    return sorted(Recipe.model_fields)


def load_recipe(spec: str | Path | dict | Recipe) -> Recipe:
    """A Recipe from a preset name, a YAML file, a dict or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return parse_recipe(spec)
    text = str(spec)
    from slimlm.compress.presets import PRESETS

    if text in PRESETS:
        return parse_recipe(PRESETS[text])
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SlimlmError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise SlimlmError(f"recipe file {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise SlimlmError(f"recipe file {path} must hold a mapping with `stages`")
        return parse_recipe(data)
    raise SlimlmError(f"unknown recipe {text!r}: give a YAML file or a preset ({', '.join(PRESETS)})")


def matches(name: str, patterns: list[str]) -> bool:
    """True if a module name matches any pattern (`re:` regex with full match, else a glob)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern):
            return True
    return False


def select_targets(names: list[str], stage: StageBase) -> list[str]:
    """The module names a stage applies to; an empty selection is an error."""
    chosen = [n for n in names if matches(n, stage.targets) and not matches(n, stage.ignore)]
    if not chosen:
        raise SlimlmError(
            f"stage {getattr(stage, 'method', '?')}: targets {stage.targets} minus ignore {stage.ignore} select no "
            f"linear layer; names look like {names[0]!r}"
        )
    return chosen
