"""Wanda: pruning by weights and activations.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024 (arXiv:2306.11695). Score S_ij = |W_ij| * ||X_j||_2 (Eq. 1), with ||X_j||_2 the norm of
input feature j over the calibration tokens; the lowest scores of each output row are pruned
(the paper's per-output comparison group), or the lowest M - N of each M consecutive inputs for
N:M. No weight update. As in the authors' code (`prune_wanda`), one pass of the block gathers the
statistics of all its linears, they are pruned, and the pruned block's outputs feed the next block.
"""

from __future__ import annotations

from typing import Literal

from slimlm.core.blocks import BlockContext, CompressionReport
from slimlm.core.stage import register
from slimlm.prune.common import block_sparsity, collect_statistics, mask_from_score, prune_targets, wanda_score
from slimlm.prune.fields import PruneFields


def wanda_block(context: BlockContext, stage: WandaStage, report: CompressionReport) -> None:
    sparsity = block_sparsity(context, stage)
    statistics = collect_statistics(context)
    prune_targets(context, report, "wanda", lambda name, _role, weight: mask_from_score(
        wanda_score(weight, statistics.pop(name)), stage, sparsity, per_row=True))


@register
class WandaStage(PruneFields):
    """Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2 compared within each output row."""

    method: Literal["wanda"] = "wanda"

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        wanda_block(context, self, report)
