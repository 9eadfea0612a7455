"""Magnitude pruning: zero the weights of smallest |W_ij|.

The classic baseline (Han et al., 2015), as the Wanda and SparseGPT papers run it on LLMs: one
threshold per layer (`scope: layer`, the reference code's default), or per output row (`scope:
row`, the comparison group of Wanda's ablation, Table 5). Data-free unless OWL ratios are asked for.
"""

from __future__ import annotations

import time

from slimlm.compress.engine import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.compress.recipe import MagnitudeStage
from slimlm.compress.sparsity import apply_mask_
from slimlm.prune.common import block_sparsity, mask_from_score


def magnitude_block(context: BlockContext, stage: MagnitudeStage, report: CompressionReport) -> None:
    sparsity = block_sparsity(context, stage)
    for name in context.targets:
        start = time.perf_counter()
        module = context.module(name)
        weight = linear_weight(module)
        mask = mask_from_score(weight.detach().abs().float(), stage, sparsity, per_row=stage.scope == "row")
        apply_mask_(module, weight, mask)
        report.layers.append(LayerReport(name, "magnitude", time.perf_counter() - start))
