"""Magnitude pruning: zero the weights of smallest |W_ij|.

The classic baseline (Han et al., 2015), as the Wanda and SparseGPT papers run it on LLMs: one
threshold per layer (`scope: layer`, the reference code's default), or per output row (`scope:
row`, the comparison group of Wanda's ablation, Table 5). Data-free unless OWL ratios are asked for.
"""

from __future__ import annotations

from typing import Literal

from slimlm.core.blocks import BlockContext, CompressionReport
from slimlm.core.stage import register
from slimlm.prune.common import block_sparsity, mask_from_score, prune_targets
from slimlm.prune.fields import PruneFields


def magnitude_block(context: BlockContext, stage: MagnitudeStage, report: CompressionReport) -> None:
    sparsity = block_sparsity(context, stage)
    prune_targets(context, report, "magnitude", lambda _name, _role, weight: mask_from_score(
        weight.detach().abs().float(), stage, sparsity, per_row=stage.scope == "row"))


@register
class MagnitudeStage(PruneFields):
    """Magnitude pruning: the smallest |W_ij| go (per layer, or per output row as Wanda's ablation)."""

    method: Literal["magnitude"] = "magnitude"
    scope: Literal["layer", "row"] = "layer"

    @property
    def needs_calibration(self) -> bool:
        return self.owl is not None

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        magnitude_block(context, self, report)
