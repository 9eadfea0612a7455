"""EoRA: eigenspace low-rank approximation of a compression error (Liu et al., arXiv:2410.21271, Sec. 3).

With E = W - W_hat the error an earlier stage left and X the layer's calibration inputs:

1. eigendecomposition of the input second moment X X^T = Q Lambda Q^T (Eq. 4);
2. projection of the error into that eigenspace, scaled by the eigenvalues: E' = E Q Lambda^(1/2) (Eq. 5);
3. truncated SVD E' ~= U_r Sigma_r V_r^T, up = U_r Sigma_r^(1/2), down' = Sigma_r^(1/2) V_r^T (Eq. 6);
4. back to the original space: down = down' Lambda^(-1/2) Q^T (Eq. 7).

The correction minimises ||(E - up down) X||_F, the layer-output error, where LoRC minimises the weight error.
`factor_bits` stores both factors on a low-bit grid (the paper reports quantizing its factors to 4 and 3 bits);
here round to nearest with one asymmetric scale per rank component.
Eigenvalues are clamped at 1e-10 of the largest before the inverse square root (the GPTQModel
implementation clamps small ones the same way). X is what enters the layer in the engine's sequential pass
(earlier blocks already compressed), gathered after the earlier stages compressed this block.
"""

from __future__ import annotations

from typing import Literal

from slimlm.core.blocks import BlockContext, CompressionReport
from slimlm.core.hessian import SharedHessians
from slimlm.core.stage import register
from slimlm.lowrank.compensation import CompensationFields, compensate_block
from slimlm.lowrank.factorize import whitened_svd, whitening


@register
class EoRAStage(CompensationFields):
    """EoRA: rank-r correction of each target's compression error in the eigenspace of its inputs."""

    method: Literal["eora"] = "eora"
    needs_original_weights = True

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        shared = SharedHessians(device=context.device)
        context.collect({name: context.module(name) for name in context.targets}, shared.add)
        hessians = {name: shared.pop(name) for name in context.targets}
        whiteners = {}  # q, k and v (gate and up) read one input: one eigendecomposition for all of them

        def fit(name, error):
            key = id(hessians[name])
            if key not in whiteners:
                whiteners[key] = whitening(hessians[name], "eigen")
            return whitened_svd(error, None, self.rank, whitener=whiteners[key])

        compensate_block(context, self, report, fit, hessians)
