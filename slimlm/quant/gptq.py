"""GPTQ: accurate post-training quantization for generative pre-trained transformers.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323). Implemented: Algorithm 1 with the
paper's three refinements, as in the IST-DASLab reference code (`gptq.py`):

- H = 2 X X^T from the calibration inputs of the layer (`slimlm.compress.hessian`); dead inputs
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

Deviation from the reference code: when a group starts in the middle of a lazy block, the
reference reads the group's weights from the matrix that has not yet received the in-block
updates; slimlm reads the fully updated weights, which is what the paper describes (the two
agree whenever the group size is a multiple of the block size).
"""

from __future__ import annotations

import time

import torch

from slimlm.compress.engine import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.compress.hessian import SharedHessians
from slimlm.compress.recipe import GPTQStage
from slimlm.errors import SlimlmError
from slimlm.models.adapter import MLP_ROLES
from slimlm.quant.grid import QuantizedWeight, find_params, group_bounds
from slimlm.quant.qlinear import QuantizedLinear

# True-sequential order inside a block (the reference code's `sequential` groups): each group is
# quantized on inputs produced by the already-quantized groups before it.
SEQUENTIAL_GROUPS = (("q", "k", "v", "qkv"), ("o",), ("gate", "up"), ("down",))


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead columns fixed, damped; returns (H, W) as new float32 tensors."""
    H, W = hessian.clone().float(), weight.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(dampening * torch.mean(torch.diag(H)))
    return H, W


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (the paper's Sec. 4, Step 3)."""
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as error:
        raise SlimlmError(
            "the damped Hessian is not positive definite: raise `dampening` (e.g. 0.1) or use more calibration data"
        ) from error


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
) -> tuple[QuantizedWeight, float]:
    """Quantize an (out, in) weight with GPTQ; returns the quantized weight and the summed OBS loss."""
    rows, columns = weight.shape
    H, W = prepare_hessian(hessian, weight, dampening)
    bounds = group_bounds(columns, group_size)
    group_of_position = _group_lookup(bounds, columns)

    static = None
    if per_tensor:
        static = [_tensor_params(W, bits, symmetric, clip)] * len(bounds)
    elif group_size is None or static_groups:
        # Per-channel (one group) and static groups: parameters from the unquantized weights.
        static = [find_params(W[:, start:end], bits, symmetric, clip) for start, end in bounds]

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(columns, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_cholesky_upper(H)

    device = W.device
    max_code = 2**bits - 1
    # Column-major copies: the loop below reads and updates one column at a time, contiguously.
    codes_t = torch.zeros(columns, rows, dtype=torch.uint8, device=device)
    group_index = torch.zeros(columns, dtype=torch.int32, device=device)  # per position in processing order
    group_params: dict[int, tuple[torch.Tensor, torch.Tensor]] = dict(enumerate(static)) if static else {}
    loss = torch.zeros(rows, device=device)
    order = perm.tolist()
    scale = zero = None
    for block_start in range(0, columns, block_size):
        block_end = min(block_start + block_size, columns)
        W1 = W[:, block_start:block_end].T.contiguous()  # (block columns, rows)
        Q1 = torch.empty_like(W1)  # integer codes, as floats until the block ends
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[block_start:block_end, block_start:block_end]
        for i in range(block_end - block_start):
            position = block_start + i
            if static is not None:
                group = group_of_position[order[position]]
                scale, zero = static[group]
            else:
                group = group_of_position[position]
                if position == bounds[group][0]:
                    width = bounds[group][1] - position
                    # The group's weights as updated so far: in-block part from W1, the rest from W.
                    current = torch.cat([W1[i:].T, W[:, block_end:]], dim=1)[:, :width]
                    scale, zero = group_params[group] = find_params(current, bits, symmetric, clip)
            group_index[position] = group
            # q = clamp(round(w / s) + z), err = (w - s (q - z)) / [H^-1]_jj: the grid's `quantize`,
            # written with in-place ops because this loop runs once per column of every layer.
            w, q, err = W1[i], Q1[i], Err1[i]
            torch.div(w, scale, out=q).round_().add_(zero).clamp_(0, max_code)
            torch.sub(q, zero, out=err).mul_(scale).neg_().add_(w).div_(Hinv1[i, i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        codes_t[block_start:block_end] = Q1.to(torch.uint8)
        loss += Err1.square().sum(0) / 2  # the OBS loss (w - q)^2 / [H^-1]_jj^2 / 2 of the paper
        W[:, block_end:] -= Err1.T @ Hinv[block_start:block_end, block_end:]

    scales = torch.stack([group_params[g][0] for g in range(len(bounds))], dim=1)
    zeros = torch.stack([group_params[g][1] for g in range(len(bounds))], dim=1)
    codes = codes_t.T
    inverse = torch.argsort(perm)
    codes = codes[:, inverse].contiguous()
    g_idx = group_index[inverse]
    trivial = torch.equal(g_idx.cpu(), torch.tensor(group_of_position, dtype=torch.int32))
    quantized = QuantizedWeight(
        codes=codes, scale=scales, zero=zeros, bits=bits, group_size=group_size, symmetric=symmetric,
        fmt="int", g_idx=None if trivial else g_idx, codebook=None,
    )
    return quantized, float(loss.sum())


def _group_lookup(bounds: list[tuple[int, int]], columns: int) -> list[int]:
    lookup = [0] * columns
    for group, (start, end) in enumerate(bounds):
        lookup[start:end] = [group] * (end - start)
    return lookup


def _tensor_params(W: torch.Tensor, bits: int, symmetric: bool, clip: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale and zero point for the whole matrix, broadcast to every row."""
    scale, zero = find_params(W.reshape(1, -1), bits, symmetric, clip)
    return scale.expand(W.shape[0]).clone(), zero.expand(W.shape[0]).clone()


def gptq_block(context: BlockContext, stage: GPTQStage, report: CompressionReport) -> None:
    """Quantize a block's target linears, one true-sequential group at a time.

    The passes for the MLP groups run the MLP half alone on the residual stream kept by the first
    of them (the attention half no longer changes by then), and so does the final pass that gives
    the next block its inputs."""
    groups = SEQUENTIAL_GROUPS if stage.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
    for roles in groups:
        names = context.names_with_roles(roles)
        if not names:
            continue
        modules = {name: context.module(name) for name in names}
        hessians = SharedHessians(device=context.device)
        mlp_only = set(roles) <= set(MLP_ROLES)
        if mlp_only and context.residual is not None:
            context.collect_mlp(modules, hessians.add)
        else:
            context.collect(modules, hessians.add, keep_residual=mlp_only)
        for name, module in modules.items():
            start = time.perf_counter()
            quantized, loss = gptq_quantize(
                linear_weight(module).detach().float(), hessians.pop(name), stage.bits,
                stage.group_columns, stage.symmetric, stage.dampening, stage.block_size, stage.act_order,
                stage.static_groups, stage.clip, per_tensor=stage.granularity == "tensor",
            )
            context.replace(name, QuantizedLinear.replacing(module, quantized))
            report.layers.append(LayerReport(name, "gptq", time.perf_counter() - start, loss))
    if context.residual is not None:
        context.next_inputs = context.run_mlp()
