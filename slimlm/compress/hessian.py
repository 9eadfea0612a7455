"""The input Hessian of a linear layer, H = 2 X^T X / n, accumulated over calibration batches.

Shared by every method that solves a layer-wise least-squares problem (GPTQ, and later
SparseGPT, OWQ, SpQR). Accumulation follows the GPTQ reference code: a running average, so the
scale of H does not grow with the number of samples, kept in float32 (float64 optional).
"""

from __future__ import annotations

import math

import torch

from slimlm.errors import SlimlmError


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.samples = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add the inputs of one forward pass: (..., in_features); each token row is one sample of X."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.hessian.dtype)
        count = x.shape[0]
        # Running average of 2 x x^T: rescale what is there, then add the new rows with weight 2/n.
        self.hessian *= self.samples / (self.samples + count)
        self.samples += count
        x = math.sqrt(2 / self.samples) * x
        self.hessian.addmm_(x.T, x)

    def result(self) -> torch.Tensor:
        if self.samples == 0:
            raise SlimlmError("no calibration inputs reached this layer: is it used in the forward pass?")
        if not torch.isfinite(self.hessian).all():
            raise SlimlmError(
                "the Hessian has NaN or Inf entries: the calibration activations overflowed; "
                "calibrate in float32 (--dtype float32) or check the model's outputs"
            )
        return self.hessian
