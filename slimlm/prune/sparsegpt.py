"""SparseGPT: massive language models can be accurately pruned in one shot.

Frantar and Alistarh, ICML 2023 (arXiv:2301.00774). Implemented: Algorithm 1 as in the authors'
code (`sparsegpt.py`, `fasterprune`):

- H = 2 X X^T from the layer's calibration inputs, dead inputs fixed, dampening lambda = 1% of
  the mean diagonal, and the upper Cholesky factor of H^-1 (shared with GPTQ,
  `slimlm.compress.hessian`);
- adaptive mask selection (Sec. 3.3): columns are processed in blocks of Bs = `block_size` (128);
  at the start of each block the weights with the smallest w^2 / [H^-1]_jj^2 across the block
  (all rows) are chosen for pruning, the block's share being the target sparsity; for N:M the
  choice is made every M columns, the M - N smallest of each row;
- weight reconstruction: column by column, the pruned (and, in joint mode, quantized) value q
  replaces w and the error (w - q) / [H^-1]_jj updates the remaining columns of the block at once
  and the rest of the matrix once per block (the lazy updates of GPTQ);
- joint sparsification and quantization (Sec. 3.5, `quantize:`): the kept weights are quantized
  in the same sweep with GPTQ's grid (`slimlm.quant.gptq.SweepGrid`: group parameters computed
  at each group's first column from the updated weights); pruned weights get the code of zero.

As in the reference code, one pass of the block gathers every linear's Hessian (no sequential
order inside a block) and the pruned block's outputs feed the next block.
"""

from __future__ import annotations

import time

import torch

from slimlm.compress.engine import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.compress.hessian import SharedHessians, inverse_cholesky_upper, prepare_hessian
from slimlm.compress.recipe import JointQuantization, SparseGPTStage
from slimlm.compress.sparsity import mark_pruned
from slimlm.prune.common import block_sparsity
from slimlm.quant.grid import QuantizedWeight, dequantize
from slimlm.quant.grid import quantize as quantize_codes
from slimlm.quant.gptq import SweepGrid
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
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        W1 = W[:, start:end].T.contiguous()  # (block columns, rows)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
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
        W[:, end:] -= Err1.T @ Hinv[start:end, end:]
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
