"""FLAP: fluctuation-based adaptive structured pruning, retraining-free, with bias compensation.

An, Zhao, Yu, Tang, Wang, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI 2024 (arXiv:2312.11983), following the authors' code (CASIA-IVA-Lab/FLAP):

- fluctuation metric (Sec. 3.2, Eq. 4, "WIFV"): for input channel j of the attention output and
  MLP down projections, S_j = Var_n(X_nj) * ||W_:,j||^2, the variance of the channel over the
  calibration tokens times the squared norm of the weight column it multiplies; the ablations
  `IFV` (variance alone) and `WIFN` (mean_i |W_ij| * ||X_j||) are available as `metric`. As in the
  authors' code, the attention channels' metric is squared before use;
- adaptive structure search (Sec. 3.3, "AL-AM"): each block's attention metric and MLP metric are
  standardised over their channels ((S - mean) / std), an attention unit scores the mean of its
  channels, and one global ranking of every unit of every block decides what goes: units are kept
  in decreasing score until their parameters are closest to (1 - ratio) of the blocks' attention
  and MLP parameters, each unit weighted by its parameter count (the code's 512/3 for a LLaMA head
  against an MLP channel). `UL-UM` removes floor(ratio * n) of the lowest-scoring units of each
  module of each block instead (the paper's uniform baseline, and slimlm's default, because
  only equal blocks load with plain transformers);
- bias compensation (Sec. 3.4, Eq. 6): the removed input channels are replaced by their
  calibration mean, folded into a bias of the projection: b = W_:,removed @ mean(X_removed).

Statistics come from the dense model (every block sees the dense block outputs), as in the code.
Deviations: with grouped-query attention the attention unit is one KV group (its key and value
heads, the query heads that read them and their output columns), because a query head cannot be
removed from one group alone; with multi-head attention that is one head, as in the paper. At
least one attention unit and one MLP channel is kept in every block (the code does not guard).

The result has a different width in each block (AL-AM) and biases on the output projections,
which a transformers config cannot describe: it is saved and loaded by `slimlm.save` /
`slimlm.load` (which record each resized linear), not by plain `from_pretrained`. With `UL-UM`
every block has the same shape and the config is updated; plain transformers then loads it
without bias compensation, or with it where the config has switches for biases (LLaMA's
`attention_bias` and `mlp_bias`: they are turned on and the linears they govern that had no bias
get a zero one, so the outputs do not change).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from slimlm.core.blocks import CompressionReport, dense_block_passes
from slimlm.core.stage import ModelContext, Stage, register
from slimlm.core.statistics import ChannelStatistics
from slimlm.models.adapter import BlockAdapter, ModelAdapter
from slimlm.prune.common import (
    attention_shape,
    declare_biases_,
    prune_block_,
    require_separate_projections,
    set_block_shape_,
)


@torch.no_grad()
def output_projection_statistics(model: PreTrainedModel, adapter: ModelAdapter, calibration: torch.Tensor,
                                 batch_size: int, device: torch.device) -> list[dict[str, ChannelStatistics]]:
    """Per block, the channel statistics of what enters its attention output (`o`) and MLP `down` projections."""
    result = []

    def hooks(block: BlockAdapter) -> list:
        result.append({role: ChannelStatistics(block.linears[role].in_features) for role in ("o", "down")})
        return [(block.linears[role], lambda _m, args, s=s: s.add_batch(args[0].cpu())) for role, s in result[-1].items()]

    for _ in dense_block_passes(model, adapter, calibration, batch_size, device, "FLAP statistics", hooks):
        pass
    return result


def channel_metric(weight: torch.Tensor, stats: ChannelStatistics, metric: str) -> torch.Tensor:
    """Per input channel: WIFV Var(X_j) ||W_:,j||^2, IFV Var(X_j), or WIFN mean_i |W_ij| ||X_j||."""
    weight = weight.detach().float().cpu()
    if metric == "IFV":
        return stats.variance()
    if metric == "WIFV":
        return stats.variance() * weight.pow(2).sum(0)
    return weight.abs().mean(0) * stats.squared_norm_per_sample().sqrt()


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def unit_costs(block: BlockAdapter, kv_heads: int) -> tuple[int, int]:
    """Parameters removed with one attention unit (KV group) and with one MLP channel."""
    lin = block.linears
    attention = sum(lin[r].weight.numel() + (lin[r].bias.numel() if lin[r].bias is not None else 0)
                    for r in ("q", "k", "v")) + lin["o"].weight.numel()
    mlp = sum(lin[r].weight.shape[1] + (lin[r].bias is not None) for r in ("gate", "up") if r in lin)
    return attention // kv_heads, mlp + lin["down"].weight.shape[0]


def _keep_adaptive(scores: list[tuple[torch.Tensor, torch.Tensor]], costs: list[tuple[int, int]],
                   ratio: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """AL-AM: one ranking of every unit of every block; keep the best until (1 - ratio) of the parameters."""
    values, weights = [], []
    for (attention, mlp), (attention_cost, mlp_cost) in zip(scores, costs):
        values += [attention, mlp]
        weights += [torch.full_like(attention, attention_cost), torch.full_like(mlp, mlp_cost)]
    values, weights = torch.cat(values), torch.cat(weights).double()
    order = torch.argsort(values, descending=True)
    kept_cost = torch.cumsum(weights[order], 0)
    threshold = values[order][torch.argmin((kept_cost - (1 - ratio) * weights.sum()).abs())]
    return [(attention > threshold, mlp > threshold) for attention, mlp in scores]


def _keep_uniform(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    remove = int(ratio * len(scores))
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[torch.argsort(scores)[:remove]] = False
    return keep


def _at_least_one(keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    if not keep.any():
        keep = keep.clone()
        keep[torch.argmax(scores)] = True
    return keep


def _compensated_bias(linear: torch.nn.Module, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Eq. 6: the removed channels' contribution at their calibration mean, plus any existing bias."""
    weight = linear.weight.detach()
    bias = weight[:, removed].double() @ mean[removed].to(weight.device).double()
    if linear.bias is not None:
        bias = bias + linear.bias.detach().double()
    return bias.to(weight.dtype)


def flap(model: PreTrainedModel, stage: FLAPStage, calibration: torch.Tensor, batch_size: int,
         device: torch.device, report: CompressionReport) -> None:
    adapter = ModelAdapter(model)
    require_separate_projections(adapter, stage.method)
    heads, kv_heads, head_dim = attention_shape(model.config)
    per_group = heads // kv_heads
    before = sum(p.numel() for p in model.parameters())
    statistics = output_projection_statistics(model, adapter, calibration, batch_size, device)
    raw = [(channel_metric(b.linears["o"].weight, s["o"], stage.metric) ** 2,
            channel_metric(b.linears["down"].weight, s["down"], stage.metric)) for b, s in zip(adapter, statistics)]
    if stage.structure == "AL-AM":
        scores = [(_standardise(a).reshape(kv_heads, -1).mean(1), _standardise(m)) for a, m in raw]
        keeps = _keep_adaptive(scores, [unit_costs(b, kv_heads) for b in adapter], stage.ratio)
    else:
        scores = [(a.reshape(kv_heads, -1).sum(1), m) for a, m in raw]
        keeps = [(_keep_uniform(a, stage.ratio), _keep_uniform(m, stage.ratio)) for a, m in scores]
    shapes = []
    with torch.no_grad():
        for block, stats, (attention_score, mlp_score), (attention_keep, mlp_keep) in zip(adapter, statistics, scores, keeps):
            attention_keep, mlp_keep = _at_least_one(attention_keep, attention_score), _at_least_one(mlp_keep, mlp_score)
            kv_keep = torch.nonzero(attention_keep)[:, 0]
            q_keep = (kv_keep[:, None] * per_group + torch.arange(per_group)[None, :]).reshape(-1)
            channel_keep = torch.nonzero(mlp_keep)[:, 0]
            removed = {"o": ~attention_keep.repeat_interleave(per_group * head_dim), "down": ~mlp_keep}
            biases = {role: _compensated_bias(block.linears[role], gone, stats[role].sum / stats[role].tokens)
                      for role, gone in removed.items()
                      if stage.bias_compensation and (gone.any() or block.linears[role].bias is not None)}
            prune_block_(block, q_keep, kv_keep, channel_keep, head_dim)
            for role, bias in biases.items():
                block.linears[role].bias = torch.nn.Parameter(bias)
            shapes.append((len(q_keep), len(kv_keep), len(channel_keep)))
    if len(set(shapes)) == 1:
        set_block_shape_(model, *shapes[0], head_dim)
        declare_biases_(model, adapter)
    after = sum(p.numel() for p in model.parameters())
    report.structure.append({
        "method": "flap", "structure": stage.structure, "metric": stage.metric,
        "kv_heads_per_block": [s[1] for s in shapes], "mlp_width_per_block": [s[2] for s in shapes],
        "uniform_blocks": len(set(shapes)) == 1, "parameters_before": before, "parameters_after": after,
        "parameter_reduction": 1 - after / before,
    })


@register
class FLAPStage(Stage):
    """FLAP (An et al., 2024): fluctuation-based structured pruning with bias compensation."""

    method: Literal["flap"] = "flap"
    whole_model: ClassVar[bool] = True  # changes the architecture: runs before the block-by-block pass
    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of the blocks' attention and MLP parameters removed")
    metric: Literal["WIFV", "IFV", "WIFN"] = Field("WIFV", description="the paper's fluctuation metric, or its ablations")
    structure: Literal["AL-AM", "UL-UM"] = Field(
        "UL-UM", description="the same fraction in every block and module (equal blocks: plain transformers loads "
        "them; the default), or the paper's adaptive widths across blocks and modules (a slimlm checkpoint)")
    bias_compensation: bool = True

    def check(self, adapter, layers: dict[str, int]) -> None:
        require_separate_projections(adapter, self.method)

    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        flap(context.model, self, context.calibration, context.batch_size, context.device, report)
