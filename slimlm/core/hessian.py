"""The input Hessian of a linear layer, H = 2 X^T X / n, accumulated over calibration batches.

Shared by every method that solves a layer-wise least-squares problem (GPTQ, and later
SparseGPT, OWQ, SpQR). Accumulation follows the GPTQ reference code: a running average, so the
scale of H does not grow with the number of samples, kept in float32 (float64 optional).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from slimlm.core import distributed
from slimlm.errors import SlimlmError


class HessianAccumulator:
    # One product per batch. Accumulating only the upper triangle in 2 x 2 column blocks does 3/4 of the
    # multiply-adds (GPTQ W4 g64 on SmolLM2, 128 x 512 tokens: 217 s instead of 242 s) but changes the rounding
    # of H: perplexity moved by 0.27% (benchmarks/results/compression_speed.md), so H stays one product.
    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.samples = 0
        self._reduced = False  # summed over the processes already (torch.distributed)

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add the inputs of one forward pass: (..., in_features); each token row is one sample of X."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.hessian.dtype)
        count = x.shape[0]
        # Running average of 2 x x^T: rescale what is there, then add the new rows with weight 2/n
        # (one fused addmm, no scaled copy of the activations).
        total = self.samples + count
        self.hessian.addmm_(x.T, x, beta=self.samples / total, alpha=2 / total)
        self.samples = total

    def result(self) -> torch.Tensor:
        """H over every calibration token; under torch.distributed, over every process's tokens (the
        token-weighted mean of the processes' running averages, `slimlm.core.distributed`)."""
        if distributed.active() and not self._reduced:
            self.samples = distributed.weighted_mean_(self.hessian, self.samples)
            self._reduced = True
        if self.samples == 0:
            raise SlimlmError("no calibration inputs reached this layer: is it used in the forward pass?")
        if not torch.isfinite(self.hessian).all():
            raise SlimlmError(
                "the Hessian has NaN or Inf entries: the calibration activations overflowed; "
                "calibrate in float32 (--dtype float32) or check the model's outputs"
            )
        return self.hessian


class SharedInputs:
    """One accumulator per distinct input: linears fed the same tensor (q, k and v; gate and up) share it.

    Accumulating X^T X costs about as much as the layer's forward pass, so computing it once per
    input rather than once per linear saves a third of the calibration time of a Llama block.
    Sharing is decided by tensor identity on each forward pass, so it is never wrong: two linears
    whose inputs merely look alike get separate accumulators. `factory(in_features)` makes an
    accumulator with `add_batch(x)`; `pop(name)` returns it (shared ones are returned to each).
    """

    def __init__(self, factory: Callable[[int], Any]):
        self.factory = factory
        self._by_name: dict[str, Any] = {}
        self._last_input: torch.Tensor | None = None  # the most recent input seen, and its accumulator
        self._last_accumulator: Any = None

    def add(self, name: str, inputs: torch.Tensor) -> None:
        if inputs is self._last_input:
            accumulator = self._last_accumulator
            if name not in self._by_name:
                self._by_name[name] = accumulator
            elif self._by_name[name] is not accumulator:  # shared before, not now: cannot happen in a fixed graph
                raise SlimlmError(f"{name}: its input was shared with another linear on one pass and not on another")
            return
        accumulator = self._by_name.get(name)
        if accumulator is None:
            accumulator = self._by_name[name] = self.factory(inputs.shape[-1])
        accumulator.add_batch(inputs)
        self._last_input, self._last_accumulator = inputs, accumulator

    def pop(self, name: str) -> Any:
        if name not in self._by_name:
            raise SlimlmError(f"no calibration inputs reached {name}: is it used in the forward pass?")
        self._last_input = self._last_accumulator = None
        return self._by_name.pop(name)


class SharedHessians(SharedInputs):
    """`SharedInputs` of Hessians; `pop` returns the Hessian itself."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(lambda columns: HessianAccumulator(columns, device, dtype))

    def pop(self, name: str) -> torch.Tensor:
        return super().pop(name).result()


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, dampening: float,
                    relative_dampening: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS solvers' (GPTQ, SparseGPT) set-up: dead inputs (H_jj = 0) get H_jj = 1 and a zero weight
    column; lambda = `dampening` * mean(diag H) is added to the diagonal, and `relative_dampening` * H_jj to
    each H_jj (a slimlm option: it shrinks the correlations between inputs toward zero, each column keeping
    its own scale; without correlations the sweep rounds each column to nearest). Returns new float32 (H, W)."""
    H, W = hessian.clone().float(), weight.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    mean = torch.mean(torch.diag(H))
    H.diagonal().mul_(1 + relative_dampening).add_(dampening * mean)
    return H, W


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (GPTQ Sec. 4, Step 3; SparseGPT Sec. 3.2 uses the same rows)."""
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as error:
        raise SlimlmError(
            "the damped Hessian is not positive definite: raise `dampening` (e.g. 0.1) or use more calibration data"
        ) from error
