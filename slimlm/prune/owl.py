"""OWL: outlier-weighed layer-wise sparsity.

Yin, Wu, Zhang, Wang, Jaiswal, Jiang, Chen, Pechenizkiy, Mocanu, Wang, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024
(arXiv:2310.05175). As in the authors' code (`prune_wanda_outlier`): a first, dense pass over the
calibration data computes each block's outlier ratio D_l, the share of Wanda scores |W_ij| ||X_j||
(over all the block's target linears) above `outlier_multiple` (M = 5) times their mean; the
ratios are rescaled to [0, 2 lam], centred, and each block keeps 1 - S + that amount, so blocks
with more outliers are pruned less and the sparsities span S - lam .. S + lam with mean S.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from slimlm.compress.engine import BlockContext, BlockInputs, _block_targets, _on_device, linear_weight, run_block
from slimlm.compress.recipe import PruneFields, StageBase
from slimlm.models.adapter import ModelAdapter
from slimlm.progress import progress
from slimlm.prune.common import collect_statistics, wanda_score


@torch.no_grad()
def outlier_ratios(model: PreTrainedModel, adapter: ModelAdapter, stage: StageBase, selected: set[str],
                   inputs: BlockInputs, device: torch.device, multiple: float) -> list[float]:
    """Percentage of outlier Wanda scores in each block of the dense model."""
    ratios = []
    for index in progress(range(len(adapter)), desc="OWL outlier ratios", total=len(adapter)):
        block = adapter.blocks[index]
        with _on_device([block], device):
            targets = _block_targets(adapter, index, stage, selected)
            context = BlockContext(model, adapter, index, block, targets, inputs, device)
            statistics = collect_statistics(context)
            scores = torch.cat([wanda_score(linear_weight(context.module(name)), statistics.pop(name)).flatten()
                                for name in targets]) if targets else torch.zeros(1)
            ratios.append(float((scores > multiple * scores.mean()).float().mean()) * 100)
            if index + 1 < len(adapter):
                inputs = BlockInputs(run_block(block, inputs), inputs.args, inputs.kwargs)
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from the outlier ratios (the reference's normalisation)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(d)
    keep = scaled - scaled.mean() + (1 - sparsity)
    return [float(1 - k) for k in keep]


def plan_owl(model: PreTrainedModel, adapter: ModelAdapter, stage: PruneFields, selected: set[str],
             inputs: BlockInputs, device: torch.device) -> list[float]:
    ratios = outlier_ratios(model, adapter, stage, selected, inputs, device, stage.owl.outlier_multiple)
    return owl_sparsities(ratios, stage.sparsity, stage.owl.lam)
