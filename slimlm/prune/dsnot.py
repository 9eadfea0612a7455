"""DSnoT: dynamic sparse no training.

Zhang, Zhao, Lin, Ji, Xu, Zhang, Ji, "Dynamic Sparse No Training: Training-Free Fine-tuning for
Sparse LLMs", ICLR 2024 (arXiv:2310.08915). Implemented as in the authors' code (`prune_DSnoT`):

1. An initial mask from Wanda (|W_ij| ||X_j||), SparseGPT's saliency (w^2 / [H^-1]_jj^2, without
   its weight update) or magnitude, per output row (or N:M).
2. For each output row, the expected reconstruction error of the sparse layer is
   r = sum over pruned j of W_ij E[x_j] (Eq. 4; E[x_j] as the reference's `sum_metric_row`: the
   sum over a sequence's tokens, averaged over sequences).
3. Prune-and-grow cycles, vectorised over rows (Eq. 5-7): regrow the pruned weight whose
   W_ij E[x_j] / Var(x_j)^`variance_power` is largest when r > 0 (smallest when r < 0), so that
   r moves toward 0; prune a kept weight: unstructured, the next candidate among the kept weights
   ordered by Wanda score and by the sign of W_ij E[x_j] (negative contributions for r > 0,
   positive for r < 0); N:M, the lowest-scoring kept weight of the regrown weight's own M-group,
   so the pattern holds. A row stops once |r| <= `update_threshold`, or (`same_sign`, the
   reference's rule for N:M) once a swap would flip the sign of r; at most `max_cycles` cycles.
4. The reference leaves the MLP linears with their initial mask (`skip_roles`).

Deviations: regrowth candidates are the pruned weights only (the reference's sorted list also
holds the kept ones, with score 0, whose "regrowth" is a no-op that would break an N:M pattern),
and the candidate pointers stop at the ends of their lists instead of running past them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slimlm.core.blocks import BlockContext, CompressionReport
from slimlm.core.hessian import HessianAccumulator, inverse_cholesky_upper, prepare_hessian
from slimlm.core.stage import register
from slimlm.core.statistics import ChannelStatistics
from slimlm.prune.common import block_sparsity, collect_statistics, mask_from_score, prune_targets, wanda_score
from slimlm.prune.fields import PruneFields


class _Accumulators:
    """Channel statistics and (for a SparseGPT initial mask) the Hessian of one input."""

    def __init__(self, columns: int, device: torch.device, hessian: bool):
        self.statistics = ChannelStatistics(columns, device)
        self.hessian = HessianAccumulator(columns, device) if hessian else None

    def add_batch(self, x: torch.Tensor) -> None:
        self.statistics.add_batch(x)
        if self.hessian is not None:
            self.hessian.add_batch(x)


def dsnot_block(context: BlockContext, stage: DSnoTStage, report: CompressionReport) -> None:
    sparsity = block_sparsity(context, stage)
    accumulators = collect_statistics(context, lambda columns: _Accumulators(columns, context.device,
                                                                             stage.initial == "sparsegpt"))

    def mask_of(name: str, role: str, weight: torch.Tensor) -> torch.Tensor:
        acc = accumulators.pop(name)
        initial = _initial_score(weight, acc, stage)
        mask = mask_from_score(initial, stage, sparsity, per_row=True)
        if role in stage.skip_roles:
            return mask
        return dsnot_refine(weight.detach().float(), mask, initial, wanda_score(weight, acc.statistics),
                            acc.statistics.sum_per_sample(), acc.statistics.variance(), stage)

    prune_targets(context, report, "dsnot", mask_of)


def _initial_score(weight: torch.Tensor, acc: _Accumulators, stage: DSnoTStage) -> torch.Tensor:
    if stage.initial == "wanda":
        return wanda_score(weight, acc.statistics)
    if stage.initial == "magnitude":
        return weight.detach().abs().float()
    H, W = prepare_hessian(acc.hessian.result(), weight.detach().float(), stage.dampening)
    return W.square() / torch.diag(inverse_cholesky_upper(H))[None, :].square()


@torch.no_grad()
def dsnot_refine(
    weight: torch.Tensor,
    mask: torch.Tensor,
    initial: torch.Tensor,
    wanda: torch.Tensor,
    channel_sum: torch.Tensor,
    variance: torch.Tensor,
    stage: DSnoTStage,
) -> torch.Tensor:
    """Prune-and-grow cycles on `mask` (True = pruned); returns the refined mask, same sparsity per row."""
    rows, columns = weight.shape
    mask = mask.clone()
    contribution = weight * channel_sum[None, :]  # W_ij E[x_j]: what pruning w_ij adds to r
    pruned = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True)[1][:, : int(mask[0].sum())]
    if pruned.shape[1] == 0 or pruned.shape[1] == columns:
        return mask
    error = (contribution * mask).sum(dim=1, keepdim=True)
    initial_sign = torch.sign(error)
    regrow_score = contribution.gather(1, pruned)
    if stage.variance_power:
        regrow_score = regrow_score / variance[pruned].clamp(min=1e-12).pow(stage.variance_power)
    regrow_order = pruned.gather(1, torch.sort(regrow_score, dim=1, stable=True)[1])  # ascending
    same_sign = stage.same_sign if stage.same_sign is not None else stage.n_m is not None
    if stage.n_m is None:
        prune_order = _pruning_candidates(mask, wanda, contribution)
        pruning_metric = None
    else:
        prune_order = None
        pruning_metric = initial.masked_fill(mask, float("inf"))

    def take(order: torch.Tensor, pointers: torch.Tensor, from_end: torch.Tensor) -> torch.Tensor:
        """The candidate at each row's pointer (front or back), and advance that pointer inward."""
        side = from_end.long()
        position = pointers.gather(1, side).clamp(0, order.shape[1] - 1)
        pointers.scatter_(1, side, position + torch.where(from_end, -1, 1))
        return order.gather(1, position)

    regrow_pointers = torch.tensor([[0, regrow_order.shape[1] - 1]]).repeat(rows, 1)
    if prune_order is not None:
        prune_pointers = torch.tensor([[0, prune_order.shape[1] - 1]]).repeat(rows, 1)
    active = torch.ones(rows, 1, dtype=torch.bool)
    for _ in range(stage.max_cycles):
        if not active.any():
            break
        regrow = take(regrow_order, regrow_pointers, error > 0)
        if prune_order is not None:
            prune = take(prune_order, prune_pointers, error < 0)
        else:
            m = stage.n_m[1]
            group = regrow - regrow % m + torch.arange(m)[None, :]  # the regrown weight's own M-group
            prune = group.gather(1, pruning_metric.gather(1, group).argmin(dim=1, keepdim=True))
            pruning_metric.scatter_(1, prune, float("inf"))
        regrow_value, prune_value = contribution.gather(1, regrow), contribution.gather(1, prune)
        after = error + prune_value - regrow_value
        active &= error.abs() > stage.update_threshold
        if same_sign:
            active &= initial_sign == torch.sign(after)
        # A swap needs a pruned weight to regrow and a kept one to prune (pointers that met, or an
        # M-group with nothing left to prune, skip this cycle): the count per row and N:M both hold.
        swap = active & mask.gather(1, regrow) & ~mask.gather(1, prune)
        mask.scatter_(1, prune, mask.gather(1, prune) | swap)
        mask.scatter_(1, regrow, mask.gather(1, regrow) & ~swap)
        error = torch.where(swap, after, error)
    return mask


def _pruning_candidates(mask: torch.Tensor, wanda: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
    """Kept weights in ascending Wanda score, reordered as the reference's `return_reorder_indice`:
    those with a negative contribution first (ascending score), then the positive ones (descending
    score), so the front serves r > 0 and the back serves r < 0."""
    kept = (~mask).sum(dim=1)[0]
    by_score = torch.sort(wanda.masked_fill(mask, float("inf")), dim=1, stable=True)[1][:, :kept]
    value = contribution.gather(1, by_score)
    rank = torch.arange(kept).expand_as(value)
    key = torch.where(value < 0, rank, torch.where(value > 0, 2 * kept - rank, kept))  # zeros in between
    return by_score.gather(1, torch.sort(key, dim=1, stable=True)[1])


@register
class DSnoTStage(PruneFields):
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

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        dsnot_block(context, self, report)
