"""SparseGPT: massive language models can be accurately pruned in one shot.

Frantar and Alistarh, ICML 2023 (arXiv:2301.00774). Implemented: Algorithm 1 as in the authors'
code (`sparsegpt.py`, `fasterprune`):

- H = 2 X X^T from the layer's calibration inputs, dead inputs fixed, dampening lambda = 1% of
  the mean diagonal, and the upper Cholesky factor of H^-1 (shared with GPTQ,
  `slimlm.core.hessian`);
- adaptive mask selection (Sec. 3.3): columns are processed in blocks of Bs = `block_size` (128);
  at the start of each block the weights with the smallest w^2 / [H^-1]_jj^2 across the block
  (all rows) are chosen for pruning, the block's share being the target sparsity; for N:M the
  choice is made every M columns, the M - N smallest of each row;
- weight reconstruction: column by column, the pruned (and, in joint mode, quantized) value q
  replaces w and the error (w - q) / [H^-1]_jj updates the remaining columns of the block at once
  and the rest of the matrix once per block (the lazy updates of GPTQ);
- joint sparsification and quantization (Sec. 3.5, `quantize:`): the kept weights are quantized
  in the same sweep with GPTQ's grid (`slimlm.quant.grid.SweepGrid`: group parameters computed
  at each group's first column from the updated weights); pruned weights get the code of zero.

As in the reference code, one pass of the block gathers every linear's Hessian (no sequential
order inside a block) and the pruned block's outputs feed the next block.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.core.hessian import SharedHessians, inverse_cholesky_upper, prepare_hessian
from slimlm.core.obs import lazy_batches
from slimlm.core.sparsity import mark_pruned
from slimlm.core.stage import register
from slimlm.errors import SlimlmError
from slimlm.prune.common import block_sparsity
from slimlm.prune.fields import PruneFields
from slimlm.quant.fields import WeightQuantFields
from slimlm.quant.grid import QuantizedWeight, SweepGrid, dequantize
from slimlm.quant.grid import quantize as quantize_codes
from slimlm.quant.qlinear import QuantizedLinear


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    quantize: JointQuantization | None = None,
) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None, float]:
    """Prune an (out, in) weight; returns (new weight, pruned mask, quantized weight or None, OBS loss)."""
    rows, columns = weight.shape
    H, W = prepare_hessian(hessian, weight, dampening)
    Hinv = inverse_cholesky_upper(H)
    identity = torch.arange(columns, device=W.device)
    grid = None
    if quantize is not None:
        grid = SweepGrid(W, identity, quantize.bits, quantize.group_columns, quantize.symmetric, quantize.clip,
                         per_tensor=quantize.granularity == "tensor")
        codes_t = torch.zeros(columns, rows, dtype=torch.uint8, device=W.device)
    mask_t = torch.zeros(columns, rows, dtype=torch.bool, device=W.device)  # column-major, True = pruned
    loss = torch.zeros(rows, device=W.device)
    for start, end, W1, Hinv1, Err1 in lazy_batches(W, Hinv, block_size):
        Q1 = torch.zeros_like(W1)
        diagonal = torch.diag(Hinv1)
        mask1 = mask_t[start:end]
        if n_m is None:  # adaptive mask: the block's smallest w^2 / [H^-1]_jj^2, all rows together
            saliency = W1.square() / diagonal[:, None].square()
            count = int(saliency.numel() * sparsity)
            if count:
                threshold = torch.sort(saliency.flatten())[0][count]
                mask1 |= saliency <= threshold
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                saliency = W1[i : i + m].square() / diagonal[i : i + m, None].square()
                lowest = torch.topk(saliency, m - n, dim=0, largest=False)[1]  # (m - n, rows)
                mask1[i : i + m].scatter_(0, lowest, True)
            w = W1[i]
            q = w.masked_fill(mask1[i], 0)
            if grid is not None:
                scale, zero = grid.at(start + i, W1, i, W, end)
                # The zero point dequantizes to exactly 0: pruned weights get it.
                code = torch.where(mask1[i], zero, quantize_codes(q, scale, zero, quantize.bits).float())
                codes_t[start + i] = code.to(torch.uint8)
                q = dequantize(code, scale, zero)
            Q1[i] = q
            err = (w - q) / Hinv1[i, i]
            loss += err.square() / 2
            W1[i:] -= Hinv1[i, i:, None] * err[None, :]
            Err1[i] = err
        W[:, start:end] = Q1.T
    quantized = grid.quantized(codes_t, identity) if grid is not None else None
    return W, mask_t.T.contiguous(), quantized, float(loss.sum())


def sparsegpt_block(context: BlockContext, stage: SparseGPTStage, report: CompressionReport) -> None:
    sparsity = block_sparsity(context, stage)
    modules = {name: context.module(name) for name in context.targets}
    hessians = SharedHessians(device=context.device)
    context.collect(modules, hessians.add)
    for name, module in modules.items():
        start = time.perf_counter()
        weight = linear_weight(module)
        pruned, _mask, quantized, loss = sparsegpt_prune(
            weight.detach().float(), hessians.pop(name), sparsity, stage.n_m, stage.block_size, stage.dampening,
            stage.quantize,
        )
        if quantized is not None:
            context.replace(name, QuantizedLinear.replacing(module, quantized))
        else:
            with torch.no_grad():
                weight.copy_(pruned.to(weight.dtype))
            mark_pruned(module)
        report.layers.append(LayerReport(name, "sparsegpt", time.perf_counter() - start, loss))


class JointQuantization(WeightQuantFields):
    """SparseGPT's joint mode: quantize the kept weights in the same sweep."""

    clip: Literal["minmax", "mse"] = "minmax"


@register
class SparseGPTStage(PruneFields):
    """SparseGPT (Frantar and Alistarh, 2023)."""

    method: Literal["sparsegpt"] = "sparsegpt"
    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of the mean Hessian diagonal added")
    block_size: int = Field(128, ge=1, description="columns per adaptive mask block and lazy update")
    quantize: JointQuantization | None = Field(None, description="quantize in the same sweep (bits, group_size, ...)")

    def check_layer(self, name: str, in_features: int) -> None:
        PruneFields.check_layer(self, name, in_features)
        if self.n_m and self.block_size % self.n_m[1]:
            raise SlimlmError(f"block_size {self.block_size} must be a multiple of M = {self.n_m[1]}")
        if self.quantize is not None:
            self.quantize.check_layer(name, in_features)

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        sparsegpt_block(context, self, report)
