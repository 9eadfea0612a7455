"""LoRC: low-rank compensation of a compression error (ZeroQuant-V2, Yao et al., arXiv:2303.08302, Sec. 5).

With E = W - W_hat the error an earlier stage left (W_hat: the quantized or pruned weight), E's truncated SVD
E ~= U_r Sigma_r V_r^T gives the correction up = U_r Sigma_r^(1/2), down = Sigma_r^(1/2) V_r^T (Eq. in Sec. 5:
U_hat = U_m Sigma_m^(1/2), V_hat = V_m Sigma_m^(1/2)), added beside the compressed layer: W_hat + up down ~= W.
It minimises ||E - up down||_F and needs no data. The factors stay in the model's float storage dtype
(bfloat16 by default), which the reported bytes count; `factor_bits` (a slimlm option) stores them on a
low-bit grid instead (round to nearest, one scale per rank component).
"""

from __future__ import annotations

from typing import Literal

from slimlm.core.blocks import BlockContext, CompressionReport
from slimlm.core.stage import register
from slimlm.lowrank.compensation import CompensationFields, compensate_block
from slimlm.lowrank.factorize import truncated_svd


@register
class LoRCStage(CompensationFields):
    """LoRC (ZeroQuant-V2): rank-r SVD of each target's compression error, kept beside the compressed layer."""

    method: Literal["lorc"] = "lorc"
    needs_original_weights = True

    @property
    def needs_calibration(self) -> bool:
        return False

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        compensate_block(context, self, report, lambda _name, error: truncated_svd(error, self.rank))
