"""Truncated SVD: the data-free low-rank baseline.

Each target linear W (out x in) becomes its best rank-r approximation in Frobenius norm (Eckart-Young):
W ~= U_r Sigma_r V_r^T, stored as up = U_r Sigma_r^(1/2) and down = Sigma_r^(1/2) V_r^T (a `LowRankLinear`).
The rank is given, or follows from the fraction of each layer's parameters to remove:
r = floor((1 - reduction) m n / (m + n)), the rule of ASVD's code (`param_ratio`). A layer whose rank would
not save parameters (r >= m n / (m + n)) is left dense and reported.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import torch

from slimlm.core.blocks import CompressionReport, linear_weight
from slimlm.core.stage import ModelContext, register
from slimlm.lowrank.common import FactorizationLog, RankFields, install_factors, target_linears
from slimlm.lowrank.factorize import output_error, truncated_svd
from slimlm.models.adapter import linear_shape
from slimlm.progress import progress


@register
class SVDStage(RankFields):
    """Truncated SVD of every target linear (no data)."""

    method: Literal["svd"] = "svd"
    whole_model: ClassVar[bool] = True

    @torch.no_grad()
    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        _adapter, linears = target_linears(context.model, self)
        log = FactorizationLog("svd")
        for name, module in progress(linears.items(), desc="svd", total=len(linears)):
            start = time.perf_counter()
            in_features, out_features = linear_shape(module)
            rank = self.layer_rank(in_features, out_features)
            if log.keeps_dense(name, rank, in_features, out_features, report):
                continue
            weight = linear_weight(module).detach().float()
            up, down = truncated_svd(weight, rank)
            install_factors(context.model, name, module, up, down)
            log.factorized(name, rank, in_features, out_features, start, output_error(weight - up @ down, None), report)
        log.summarize(report)
