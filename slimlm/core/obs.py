"""The left-to-right Optimal Brain Surgeon sweep in lazy batches, shared by GPTQ and SparseGPT.

GPTQ (Frantar et al., ICLR 2023, Sec. 3, "Lazy Batch-Updates", Algorithm 1) and SparseGPT (Frantar and
Alistarh, ICML 2023, Algorithm 1) process a weight's columns left to right: each column is fixed (quantized,
or pruned), its error err_j = (w_j - q_j) / [H^-1]_jj is spread over the columns to its right inside the
current block, and once the block ends the later columns get the block's errors at once:

    W[:, end:] -= Err1^T H^-1[start:end, end:]

`lazy_batches` is that outer loop; each method writes its own column step (what "fixing" a column means).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def lazy_batches(W: torch.Tensor, Hinv: torch.Tensor, block_size: int
                 ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (start, end, W1, Hinv1, Err1) for each block of `block_size` columns of W (rows, columns).

    W1 is the block's weights, column-major (block columns, rows), for the caller to update in place;
    Hinv1 is the block of the upper Cholesky factor of H^-1; the caller fills Err1 (like W1) with each
    column's error. When the caller asks for the next block, the block's errors update W's later columns.
    """
    columns = W.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        W1 = W[:, start:end].T.contiguous()  # column-major: the column loop reads one column at a time
        Err1 = torch.empty_like(W1)
        yield start, end, W1, Hinv[start:end, start:end], Err1
        W[:, end:] -= Err1.T @ Hinv[start:end, end:]
