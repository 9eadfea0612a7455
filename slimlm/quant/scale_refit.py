"""Least-squares refit of a quantized weight's group scales on the layer-output objective, codes fixed.

GPTQ (Frantar et al., ICLR 2023) chooses each group's scale once, from the weights as they are when the
sweep reaches the group (or, with static groups, from the unquantized weights), and then picks the codes.
With the codes fixed, the scales that minimise GPTQ's own objective, the layer-output error

    || (W - W^) X ||^2 = sum_r (w_r - w^_r)^T H (w_r - w^_r),   H = X X^T (dampened as in GPTQ),

have a closed form: row r's dequantized weight is w^_r = D_r s_r with D_r[j, g] = (q_rj - z_rg) for the
columns j of group g (0 elsewhere), so

    s_r = (D_r^T H D_r)^-1 D_r^T H w_r,

one G x G solve per output row (G groups). This is llama.cpp's per-block weighted least-squares scale
refit (`make_qx_quants`, which fits each block's scale to the block's codes under a diagonal weighting)
taken to the full H of GPTQ and to all groups of a row jointly. Zero points, codes and the storage
format stay as they were, so a GGUF Q4_0 / Q4_1 layout is carried exactly as before. A slimlm extension
(`refit_scales` of the GPTQ stage), not part of the GPTQ paper; it never increases the objective, up to
a tiny ridge (1e-6 of the mean diagonal) that keeps groups with all-zero levels at their old scale.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from slimlm.quant.grid import QuantizedWeight, column_groups

RIDGE = 1e-6  # relative to the mean diagonal of each row's system
ROWS_PER_CHUNK = 64  # bounds the [rows, in, groups] temporaries


def refit_group_scales(quantized: QuantizedWeight, weight: Tensor, hessian: Tensor) -> QuantizedWeight:
    """The same codes and zero points with each row's group scales refit (see the module docstring).
    `weight` (out, in) is the unquantized weight and `hessian` (in, in) the dampened H the codes were chosen on."""
    if quantized.fmt != "int" or quantized.codebook is not None:
        raise ValueError("scale refit applies to integer grids only")
    groups = column_groups(quantized.in_features, quantized.group_size, quantized.g_idx).to(weight.device)
    count = quantized.n_groups
    H = hessian.float()
    W = weight.float()
    zero, scale = quantized.zero.float(), quantized.scale.float()
    levels = quantized.codes.float() - zero[:, groups]  # (out, in): w^ = scale[:, group] * levels
    membership = torch.nn.functional.one_hot(groups, count).float()  # (in, G)
    right = (levels * (W @ H)) @ membership  # (out, G): D_r^T H w_r
    refit = torch.empty_like(scale)
    for start in range(0, W.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        D = levels[rows, :, None] * membership  # (R, in, G)
        system = D.transpose(1, 2) @ (H @ D)  # (R, G, G): D^T H D
        diagonal = system.diagonal(dim1=1, dim2=2)
        empty = diagonal <= 0  # a group whose levels are all zero: its scale does not matter; keep it
        ridge = RIDGE * diagonal.clamp_min(0).mean(dim=1, keepdim=True).clamp_min(1e-30)
        diagonal += ridge + empty.float()
        rhs = right[rows] + ridge * scale[rows] + empty.float() * scale[rows]
        refit[rows] = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)
    refit = torch.where(torch.isfinite(refit), refit, scale)
    return dataclasses.replace(quantized, scale=refit.to(quantized.scale.dtype))
