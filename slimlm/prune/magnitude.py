"""Magnitude pruning: zero the weights of smallest |W_ij|.

The classic baseline (Han et al., 2015), as the Wanda and SparseGPT papers run it on LLMs: one
threshold per layer (`scope: layer`, the reference code's default), or per output row (`scope:
row`, the comparison group of Wanda's ablation, Table 5). Data-free unless OWL ratios are asked for.
"""

from __future__ import annotations

from slimlm.compress.engine import BlockContext, CompressionReport
from slimlm.compress.recipe import MagnitudeStage
from slimlm.prune.common import block_sparsity, mask_from_score, prune_targets


def magnitude_block(context: BlockContext, stage: MagnitudeStage, report: CompressionReport) -> None:
    sparsity = block_sparsity(context, stage)
    prune_targets(context, report, "magnitude", lambda _name, _role, weight: mask_from_score(
        weight.detach().abs().float(), stage, sparsity, per_row=stage.scope == "row"))
