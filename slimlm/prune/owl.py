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
from pydantic import Field
from transformers import PreTrainedModel

from slimlm.core.blocks import BlockContext, BlockInputs, block_targets, linear_weight, on_device, run_block
from slimlm.core.stage import Stage, StrictModel
from slimlm.models.adapter import ModelAdapter
from slimlm.progress import progress
from slimlm.prune.common import collect_statistics, wanda_score


@torch.no_grad()
def outlier_ratios(model: PreTrainedModel, adapter: ModelAdapter, stage: Stage, selected: set[str],
                   inputs: BlockInputs, device: torch.device, multiple: float) -> list[float]:
    """Percentage of outlier Wanda scores in each block of the dense model."""
    ratios = []
    for index in progress(range(len(adapter)), desc="OWL outlier ratios", total=len(adapter)):
        block = adapter.blocks[index]
        with on_device([block], device):
            targets = block_targets(adapter, index, stage, selected)
            context = BlockContext(model, adapter, index, block, targets, inputs, device)
            statistics = collect_statistics(context)
            scores = torch.cat([wanda_score(linear_weight(context.module(name)), statistics.pop(name)).flatten()
                                for name in targets]) if targets else torch.zeros(1)
            ratios.append(float((scores > multiple * scores.mean()).float().mean()) * 100)
            if index + 1 < len(adapter):
                inputs = inputs.following(run_block(block, inputs))
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from the outlier ratios (the reference's normalisation)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(d)
    keep = scaled - scaled.mean() + (1 - sparsity)
    return [float(1 - k) for k in keep]


def plan_owl(model: PreTrainedModel, adapter: ModelAdapter, stage: OWLMixin, selected: set[str],
             inputs: BlockInputs, device: torch.device) -> list[float]:
    ratios = outlier_ratios(model, adapter, stage, selected, inputs, device, stage.owl.outlier_multiple)
    return owl_sparsities(ratios, stage.sparsity, stage.owl.lam)


class OWLConfig(StrictModel):
    """OWL (Yin et al., 2024): non-uniform sparsity per block from its share of outlier scores."""

    lam: float = Field(0.08, gt=0, lt=1, description="block sparsities span target - lam .. target + lam")
    outlier_multiple: float = Field(5.0, gt=0, description="an outlier is a Wanda score above this many times the block mean")


class OWLMixin(Stage):
    """A pruning stage whose `owl` setting replaces the uniform sparsity by OWL's per block: `plan` runs the
    dense pre-pass and hands each block its sparsity (`BlockContext.plan`)."""

    owl: OWLConfig | None = None

    def plan(self, model: PreTrainedModel, adapter: ModelAdapter, selected: set[str], inputs: BlockInputs | None,
             device: torch.device) -> list[float] | None:
        return None if self.owl is None else plan_owl(model, adapter, self, selected, inputs, device)
