"""Per-input-channel statistics of a linear's calibration inputs (Wanda's ||X_j||_2, DSnoT's mean and
variance, OWL's outlier scores). Accumulated over batches like the Hessian (`slimlm.core.hessian`),
and shared the same way between linears that read one tensor (`SharedInputs(ChannelStatistics)`)."""

from __future__ import annotations

import torch

from slimlm.core import distributed


class ChannelStatistics:
    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.samples = 0  # sequences: DSnoT's sums are per sequence, averaged over sequences
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64, device=device)
        self._reduced = False

    def _all(self) -> None:
        """Under torch.distributed, the sums over every process's tokens (once, at the first read)."""
        if distributed.active() and not self._reduced:
            counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64, device=self.sum.device)
            distributed.all_reduce_sum_(counts, self.sum, self.sum_squares)
            self.tokens, self.samples = int(counts[0].item()), int(counts[1].item())
            self._reduced = True

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Inputs (batch, seq, in_features) or (tokens, in_features)."""
        self.samples += inputs.shape[0] if inputs.dim() == 3 else 1
        x = inputs.reshape(-1, inputs.shape[-1]).double()  # float64 sums: the variance subtracts two of them
        self.tokens += x.shape[0]
        self.sum += x.sum(0)
        self.sum_squares += x.square().sum(0)

    def squared_norm_per_sample(self) -> torch.Tensor:
        """||X_j||^2 over all tokens / number of sequences: Wanda's `scaler_row` (its score uses the square root)."""
        self._all()
        return (self.sum_squares / self.samples).float()

    def sum_per_sample(self) -> torch.Tensor:
        """sum of x_j over all tokens / number of sequences: DSnoT's `sum_metric_row`."""
        self._all()
        return (self.sum / self.samples).float()

    def variance(self) -> torch.Tensor:
        """Population variance of each input channel over all tokens."""
        self._all()
        mean = self.sum / self.tokens
        return (self.sum_squares / self.tokens - mean.square()).clamp(min=0).float()
