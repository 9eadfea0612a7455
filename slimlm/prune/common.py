"""What the unstructured pruning methods share: the block's sparsity, the mask from a score, stats collection."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from slimlm.compress.engine import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.compress.hessian import SharedInputs
from slimlm.compress.recipe import PruneFields
from slimlm.compress.sparsity import apply_mask_, n_m_mask, unstructured_mask
from slimlm.compress.statistics import ChannelStatistics


def block_sparsity(context: BlockContext, stage: PruneFields) -> float:
    """The stage's sparsity, or this block's OWL sparsity when the recipe asks for OWL."""
    return context.sparsity if context.sparsity is not None else stage.sparsity


def mask_from_score(score: torch.Tensor, stage: PruneFields, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """True where pruned: the lowest scores of each M-group (N:M), of each row, or of the layer."""
    if stage.n_m is not None:
        return n_m_mask(score, *stage.n_m)
    return unstructured_mask(score, sparsity, per_row)


def collect_statistics(context: BlockContext, factory: Callable[[int], Any] | None = None) -> SharedInputs:
    """One calibration pass over the block feeding each target linear's input to an accumulator from
    `factory(in_features)` (default: ChannelStatistics), shared between linears that read one tensor."""
    statistics = SharedInputs(factory or (lambda columns: ChannelStatistics(columns, context.device)))
    context.collect({name: context.module(name) for name in context.targets}, statistics.add)
    return statistics


def prune_targets(context: BlockContext, report: CompressionReport, method: str,
                  mask_of: Callable[[str, str, torch.Tensor], torch.Tensor]) -> None:
    """Zero each target linear's weights where `mask_of(name, role, weight)` is True, timing each."""
    for name, role in context.targets.items():
        start = time.perf_counter()
        module = context.module(name)
        weight = linear_weight(module)
        apply_mask_(module, weight, mask_of(name, role, weight))
        report.layers.append(LayerReport(name, method, time.perf_counter() - start))


def wanda_score(weight: torch.Tensor, statistics: ChannelStatistics) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Eq. 1)."""
    return weight.detach().abs().float() * statistics.squared_norm_per_sample().sqrt()[None, :]
