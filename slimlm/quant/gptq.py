"""GPTQ: accurate post-training quantization for generative pre-trained transformers.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323). Implemented: Algorithm 1 with the
paper's three refinements, as in the IST-DASLab reference code (`gptq.py`):

- H = 2 X X^T from the calibration inputs of the layer (`slimlm.core.hessian`); dead inputs
  (H_jj = 0) get H_jj = 1 and a zero weight column;
- dampening: lambda = `dampening` * mean(diag H) added to the diagonal;
- the upper Cholesky factor of H^-1 replaces the repeated inverse updates (Eq. 5 becomes a row of
  the factor): for column j, err = (w_j - q(w_j)) / [H^-1]_jj and the remaining columns get
  W_{:, j+1:} -= err [H^-1]_{j, j+1:};
- lazy batch updates: columns are processed in blocks of `block_size` (128); updates inside the
  block are immediate, the rest of the matrix is updated once per block (Eq. in Sec. 4, Step 2);
- group-wise quantization: a group's scale and zero point are computed when the algorithm reaches
  the group's first column, from the weights as updated so far;
- act-order (`desc_act`): columns in order of decreasing H_jj, with the group index of each column
  (`g_idx`) stored; `static_groups` computes all groups' parameters up front from the unquantized
  weights in the original column order, so that g_idx stays trivial under act-order.

Optional extensions (off by default, not in the paper): `relative_dampening` delta adds delta * H_jj to each
H_jj (on top of the paper's dampening), shrinking the input correlations the sweep compensates through
(delta -> infinity: each column rounded to nearest, with the weighted_lsq scales still weighted by H_jj, which
is llama.cpp's importance-matrix quantization); `refit_scales` refits each row's group scales by
least squares on the layer-output objective once the codes are chosen (`slimlm.quant.scale_refit`).

Deviation from the reference code: when a group starts in the middle of a lazy block, the
reference reads the group's weights from the matrix that has not yet received the in-block
updates; slimlm reads the fully updated weights, which is what the paper describes (the two
agree whenever the group size is a multiple of the block size).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.core.hessian import SharedHessians, inverse_cholesky_upper, prepare_hessian
from slimlm.core.obs import lazy_batches
from slimlm.core.sequential import SequentialPass
from slimlm.core.sparsity import pruned_mask
from slimlm.core.stage import Stage, register
from slimlm.quant.fields import ClipField, WeightQuantFields
from slimlm.quant.grid import QuantizedWeight, SweepGrid
from slimlm.quant.qlinear import QuantizedLinear
from slimlm.quant.scale_refit import refit_group_scales

# True-sequential order inside a block (the reference code's `sequential` groups): each group is
# quantized on inputs produced by the already-quantized groups before it.
SEQUENTIAL_GROUPS = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    dampening: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    clip: str = "minmax",
    per_tensor: bool = False,
    keep_zero: torch.Tensor | None = None,
    refit_scales: bool = False,
    relative_dampening: float = 0.0,
) -> tuple[QuantizedWeight, float]:
    """Quantize an (out, in) weight with GPTQ; returns the quantized weight and the summed OBS loss.

    `keep_zero` (a boolean mask of the weight's shape) pins those weights to exactly zero, their
    error compensated like any other: GPTQ on a pruned layer keeps its sparsity pattern (SparseGPT's
    joint sparsify-and-quantize sweep with a fixed mask). `refit_scales`: after the sweep, each row's
    group scales are refit by least squares on the same objective, codes fixed (`slimlm.quant.scale_refit`)."""
    rows, columns = weight.shape
    H, W = prepare_hessian(hessian, weight, dampening, relative_dampening)
    H_natural, W_natural = H, W  # the column order the refit works in (the sweep permutes copies)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(columns, device=W.device)
    # weighted_lsq: the column importance is the Hessian's diagonal before dampening (2 x mean squared input)
    importance = torch.diag(hessian).float() if clip == "weighted_lsq" else None
    grid = SweepGrid(W, perm, bits, group_size, symmetric, clip, static_groups, per_tensor, importance)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_cholesky_upper(H)
    zero_t = keep_zero[:, perm].T.contiguous() if keep_zero is not None else None

    device = W.device
    max_code = 2**bits - 1
    # Column-major copies: the loop below reads and updates one column at a time, contiguously.
    codes_t = torch.zeros(columns, rows, dtype=torch.uint8, device=device)
    loss = torch.zeros(rows, device=device)
    for block_start, block_end, W1, Hinv1, Err1 in lazy_batches(W, Hinv, block_size):
        Q1 = torch.empty_like(W1)  # integer codes, as floats until the block ends
        for i in range(block_end - block_start):
            scale, zero = grid.at(block_start + i, W1, i, W, block_end)
            # q = clamp(round(w / s) + z), err = (w - s (q - z)) / [H^-1]_jj: the grid's `quantize`,
            # written with in-place ops because this loop runs once per column of every layer.
            w, q, err = W1[i], Q1[i], Err1[i]
            torch.div(w, scale, out=q).round_().add_(zero).clamp_(0, max_code)
            if zero_t is not None:
                torch.where(zero_t[block_start + i], zero, q, out=q)  # code z dequantizes to exactly 0
            torch.sub(q, zero, out=err).mul_(scale).neg_().add_(w).div_(Hinv1[i, i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        codes_t[block_start:block_end] = Q1.to(torch.uint8)
        loss += Err1.square().sum(0) / 2  # the OBS loss (w - q)^2 / [H^-1]_jj^2 / 2 of the paper
    quantized = grid.quantized(codes_t, perm)
    if refit_scales:
        quantized = refit_group_scales(quantized, W_natural, H_natural)
    return quantized, float(loss.sum())


def gptq_block(context: BlockContext, stage: GPTQStage, report: CompressionReport) -> None:
    """Quantize a block's target linears, one true-sequential group at a time, each group's inputs computed
    once with the groups before it already quantized (`slimlm.core.sequential`); the block's output for the
    next block comes from the same pass where the block allows it."""
    sequence = SequentialPass(context) if stage.true_sequential else None
    for roles in SEQUENTIAL_GROUPS if stage.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),):
        names = context.names_with_roles(roles)
        if not names:
            continue
        modules = {name: context.module(name) for name in names}
        hessians = SharedHessians(device=context.device)
        if sequence is not None:
            sequence.collect(roles, modules, hessians.add)
        else:
            context.collect(modules, hessians.add)
        for name, module in modules.items():
            start = time.perf_counter()
            weight = linear_weight(module).detach().float()
            quantized, loss = gptq_quantize(
                weight, hessians.pop(name), stage.bits, stage.group_columns, stage.symmetric, stage.dampening,
                stage.block_size, stage.act_order, stage.static_groups, stage.clip,
                per_tensor=stage.granularity == "tensor", keep_zero=pruned_mask(module, weight),
                refit_scales=stage.refit_scales, relative_dampening=stage.relative_dampening,
            )
            context.replace(name, QuantizedLinear.replacing(module, quantized))
            report.layers.append(LayerReport(name, "gptq", time.perf_counter() - start, loss))
    if sequence is not None:
        context.next_inputs = sequence.outputs()


@register
class GPTQStage(WeightQuantFields, ClipField, Stage):
    """GPTQ (Frantar et al., 2023)."""

    method: Literal["gptq"] = "gptq"
    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of the mean Hessian diagonal added")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    relative_dampening: float = Field(0.0, ge=0, description="added to each Hessian diagonal entry as a multiple of "
                                      "itself (a slimlm extension; 0 = the paper's GPTQ; large = round to nearest "
                                      "with the weighted_lsq scales)")
    refit_scales: bool = Field(False, description="after the sweep, refit each row's group scales by least squares "
                               "on GPTQ's objective, codes fixed (a slimlm extension: slimlm.quant.scale_refit)")

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        gptq_block(context, self, report)
