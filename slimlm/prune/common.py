"""What the unstructured pruning methods share: the block's sparsity, the mask from a score, stats collection."""

from __future__ import annotations

import torch

from slimlm.compress.engine import BlockContext
from slimlm.compress.hessian import SharedInputs
from slimlm.compress.recipe import PruneFields
from slimlm.compress.sparsity import n_m_mask, unstructured_mask
from slimlm.compress.statistics import ChannelStatistics


def block_sparsity(context: BlockContext, stage: PruneFields) -> float:
    """The stage's sparsity, or this block's OWL sparsity when the recipe asks for OWL."""
    return context.sparsity if context.sparsity is not None else stage.sparsity


def mask_from_score(score: torch.Tensor, stage: PruneFields, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """True where pruned: the lowest scores of each M-group (N:M), of each row, or of the layer."""
    if stage.n_m is not None:
        return n_m_mask(score, *stage.n_m)
    return unstructured_mask(score, sparsity, per_row)


def collect_channel_statistics(context: BlockContext, names: list[str]) -> SharedInputs:
    """One calibration pass over the block gathering ChannelStatistics of each named linear's input."""
    statistics = SharedInputs(lambda columns: ChannelStatistics(columns, context.device))
    context.collect({name: context.module(name) for name in names}, statistics.add)
    return statistics


def wanda_score(weight: torch.Tensor, statistics: ChannelStatistics) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Eq. 1)."""
    return weight.detach().abs().float() * statistics.squared_norm_per_sample().sqrt()[None, :]
