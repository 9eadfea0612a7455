"""Sparsity masks: selecting which weights to prune from a score, and remembering that a linear was pruned.

Shared by every pruning method (magnitude, Wanda, SparseGPT, DSnoT) and by the methods that run
after one in the same recipe (GPTQ keeps a pruned layer's zeros; see `gptq_quantize(keep_zero=)`).

Conventions: a mask is a boolean tensor of the weight's (out, in) shape, True where the weight is
pruned. "N:M" means at most N non-zeros in every M consecutive weights along the input dimension
(2:4 keeps 2 of every 4), as in NVIDIA's semi-structured sparsity.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.errors import SlimlmError

PRUNED = "slimlm_pruned"  # attribute set on a linear once a pruning stage has zeroed some of its weights


def mark_pruned(module: nn.Module) -> None:
    setattr(module, PRUNED, True)


def pruned_mask(module: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """The zeros of a linear that an earlier pruning stage pruned (True = pruned), else None."""
    return weight == 0 if getattr(module, PRUNED, False) else None


def parse_n_m(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M."""
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise SlimlmError(f"N:M pattern must look like '2:4' (got {pattern!r})") from None
    if not 0 < n < m:
        raise SlimlmError(f"N:M pattern needs 0 < N < M (got {pattern!r})")
    return n, m


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune the `sparsity` fraction of lowest scores: within each output row (Wanda's comparison
    group), or across the whole layer (plain magnitude pruning)."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if per_row:
        count = int(score.shape[1] * sparsity)
        indices = torch.sort(score, dim=1, stable=True)[1][:, :count]
        return mask.scatter_(1, indices, True)
    count = int(score.numel() * sparsity)
    indices = torch.sort(score.flatten(), stable=True)[1][:count]
    return mask.view(-1).scatter_(0, indices, True).view_as(score)


def n_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the M - N lowest scores of every M consecutive input columns, row by row."""
    rows, columns = score.shape
    if columns % m:
        raise SlimlmError(f"N:M sparsity with M = {m} needs in_features divisible by {m} (got {columns})")
    groups = score.reshape(rows, columns // m, m)  # reshape copies a transposed (Conv1D) view
    lowest = torch.topk(groups, m - n, dim=2, largest=False)[1]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True).reshape(rows, columns)


def check_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every M consecutive weights along the input dimension hold at most N non-zeros."""
    rows, columns = weight.shape
    return bool(((weight != 0).reshape(rows, columns // m, m).sum(dim=2) <= n).all())


def apply_mask_(module: nn.Module, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the masked weights of `module` (whose (out, in) weight view is `weight`) and mark it pruned."""
    with torch.no_grad():
        weight.masked_fill_(mask.to(weight.device), 0)
    mark_pruned(module)
