"""SmoothQuant: migrate the activations' outlier channels into the weights, then W8A8.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", ICML 2023 (arXiv:2211.10438). Activations of LLMs have a few input
channels with very large magnitudes, which ruin a per-token (or per-tensor) int8 grid, while the
weights are easy to quantize. For each group of linears that read one normalized tensor ([q, k, v]
or a fused qkv after the attention norm; [gate, up] or [up] after the MLP norm), Eq. 4:

    s_j = max_t |X_tj|^alpha / max_{linears of the group, i} |W_ij|^(1 - alpha)

with max |X_j| over the calibration tokens. Y = (X diag(s)^-1)(diag(s) W^T): the norm's weight (and
bias) is divided by s and each linear's weight columns multiplied by s, so the float model is
unchanged (the folding code is AWQ's, `slimlm.quant.awq.apply_scales` on
`slimlm.core.transforms`). Then every target linear becomes an `Int8Linear` (int8 symmetric
per-channel weights; activations per token by default, or per tensor, static, calibrated on the
smoothed inputs).

alpha (default 0.5, the paper's choice for most models) may instead be searched per block over
`alpha_grid`: for each candidate, a copy of the block is smoothed and quantized and the one with the
lowest mean squared error of the block output against the float block on the calibration inputs
is kept.

As in the reference code (mit-han-lab/smoothquant, `smooth.py`), the scales and the weight maxima
are clamped at 1e-5, and only the linears after a norm are smoothed: o and down take their inputs
unsmoothed (their int8 grids see the raw activations). Deviations: the statistics and the search
run inside slimlm's sequential block pass, so each block's max |X_j| are measured on the outputs
of the already-quantized earlier blocks (the reference measures them once on the float model);
the alpha search (per block) is slimlm's, the paper picks one alpha per model by hand.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from transformers import PreTrainedModel

from slimlm.core.blocks import (
    BlockContext,
    CompressionReport,
    collect_block_inputs,
    dense_block_passes,
    linear_weight,
    run_block,
)
from slimlm.core.stage import Stage, register
from slimlm.errors import SlimlmError
from slimlm.models.adapter import BlockAdapter, ModelAdapter, require_norm_per_half
from slimlm.quant.awq import ScalingGroup, apply_scales
from slimlm.quant.fields import ActivationQuantConfig, GroupSize, WeightActivationFields
from slimlm.quant.rtn import replace_quantizing_inputs, wa_layer


# (norm role, roles of the linears reading that norm's output)
@dataclass
class SmoothingGroup:
    norm: str  # path of the norm inside the block
    linears: list[str]  # paths of the linears that read its output


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise SlimlmError(f"SmoothQuant alpha must be in [0, 1] (got {alpha!r}); the paper uses 0.5 for most models")
    return float(alpha)


def smoothing_groups(block: BlockAdapter) -> list[SmoothingGroup]:
    """The norm -> linears pairs of a block, from the architecture adapter's roles."""
    require_norm_per_half([block], "SmoothQuant")
    return [SmoothingGroup(block.norm_names[norm], [block.linear_names[role] for role in roles])
            for norm, roles in block.norm_readers().items()]


def smoothing_scales(activation_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 4: s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha) over the group's (out, in) weights."""
    weight_max = torch.cat([w.detach().abs().float() for w in weights]).amax(dim=0).clamp(min=1e-5)
    activation_max = activation_max.float().to(weight_max.device)
    return (activation_max.pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_block_(block: nn.Module, groups: list[SmoothingGroup], activation_max: list[torch.Tensor],
                  alpha: float, norm_offset: float = 0.0) -> list[torch.Tensor]:
    """Fold the smoothing scales of each group into `block` (the float function is unchanged); returns them."""
    applied = []
    for group, stats in zip(groups, activation_max):
        linears = {name: block.get_submodule(name) for name in group.linears}
        scales = smoothing_scales(stats, [linear_weight(m) for m in linears.values()], alpha)
        apply_scales(ScalingGroup(block.get_submodule(group.norm), True, group.linears, "smoothquant"),
                     linears, scales, norm_offset)
        applied.append(scales)
    return applied


class _ChannelMax:
    """Running max |x_j| per input channel of each group's (shared) input."""

    def __init__(self, count: int) -> None:
        self.values: list[torch.Tensor | None] = [None] * count

    def update(self, index: int, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise SlimlmError("calibration activations hold NaN or infinite values; check the model in float first")
        current = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        previous = self.values[index]
        self.values[index] = current if previous is None else torch.maximum(previous, current)


@torch.no_grad()
def smooth_model_(model: PreTrainedModel, calibration: torch.Tensor, alpha: float = 0.5, batch_size: int = 8,
                  device: str | torch.device | None = None) -> None:
    """Smooth every block of a float model in place (no quantization): the logits stay the same."""
    alpha = check_alpha(alpha)
    adapter = ModelAdapter(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stats = _ChannelMax(0)

    def hooks(block: BlockAdapter):
        groups = smoothing_groups(block)
        stats.values = [None] * len(groups)
        return [(block.module.get_submodule(g.linears[0]), lambda _m, args, i=i: stats.update(i, args[0]))
                for i, g in enumerate(groups)]

    passes = dense_block_passes(model, adapter, calibration, batch_size, device, "smooth", hooks)
    for block, _inputs, _outputs in passes:
        smooth_block_(block.module, smoothing_groups(block), stats.values, alpha, adapter.norm_weight_offset)


@torch.no_grad()
def smoothquant_block(context: BlockContext, stage: SmoothQuantStage, report: CompressionReport) -> None:
    start = time.perf_counter()
    block = context.adapter[context.index]
    groups = smoothing_groups(block)
    for group in groups:  # an earlier stage's compressed linear cannot take scaled columns
        for name in group.linears:
            linear_weight(block.module.get_submodule(name))
    stats = _ChannelMax(len(groups))
    firsts = {str(i): block.module.get_submodule(g.linears[0]) for i, g in enumerate(groups)}
    context.collect(firsts, lambda key, x: stats.update(int(key), x))
    alpha, errors = stage.alpha, {}
    if stage.alpha_grid:
        reference = context.run()
        errors = {a: _quantized_error(context, groups, stats.values, a, stage, reference) for a in stage.alpha_grid}
        alpha = min(errors, key=errors.get)
    smooth_block_(block.module, groups, stats.values, alpha, context.adapter.norm_weight_offset)
    smoothing_seconds = time.perf_counter() - start
    first = len(report.layers)
    replace_quantizing_inputs(context, stage, stage.activations, stage.clip, report, f"smoothquant(alpha={alpha:g})")
    for entry in report.layers[first:]:  # share the smoothing time among the block's layers
        entry.seconds += smoothing_seconds / max(1, len(report.layers) - first)


def _quantized_error(context: BlockContext, groups: list[SmoothingGroup], activation_max: list[torch.Tensor],
                     alpha: float, stage: SmoothQuantStage, reference: list[torch.Tensor]) -> float:
    """Mean squared error of a smoothed, quantized copy of the block against the float block's outputs."""
    trial = copy.deepcopy(context.block)
    smooth_block_(trial, groups, activation_max, alpha, context.adapter.norm_weight_offset)
    prefix = f"{context.adapter.blocks_name}.{context.index}."
    names = [name[len(prefix):] for name in context.targets]
    layers = {name: wa_layer(trial.get_submodule(name), stage, stage.activations, stage.clip) for name in names}
    if stage.activations.granularity == "per_tensor":
        collect_block_inputs(trial, context.inputs, {n: trial.get_submodule(n) for n in names},
                             lambda n, x: layers[n].input_quantizer.observe(x))
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(trial.get_submodule(parent) if parent else trial, child, layer)
    outputs = run_block(trial, context.inputs)
    error = sum(float((out.float() - ref.float()).pow(2).sum()) for out, ref in zip(outputs, reference))
    return error / sum(ref.numel() for ref in reference)


@register
class SmoothQuantStage(WeightActivationFields, Stage):
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

    def check(self, adapter: ModelAdapter, layers: dict[str, int]) -> None:
        super().check(adapter, layers)
        require_norm_per_half(adapter, "SmoothQuant")

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        smoothquant_block(context, self, report)
