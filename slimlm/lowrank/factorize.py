"""The low-rank math every method of `slimlm.lowrank` shares.

A weight W (out x in) is replaced by two factors, `up` (out x r) and `down` (r x in), with
W ~= up @ down, so y = x W^T becomes (x down^T) up^T: r (in + out) parameters instead of in x out.
That saves parameters only while r < in out / (in + out) (`break_even_rank`); factorization stages
leave a layer whose rank would not save anything dense, and say so.

Three truncations, each the optimum of its own objective (Eckart-Young):

- `truncated_svd(W, r)`: min ||W - W_r||_F (plain SVD).
- `scaled_svd(W, s, r)`: SVD of W diag(s), with diag(s)^-1 folded back into `down`: min ||(W - W_r) diag(s)||_F
  (ASVD's per-input-channel activation scaling).
- `whitened_svd(W, H, r, basis)`: min ||(W - W_r) X||_F for H = X X^T: the SVD of W S, with S S^T = H, and S^-1
  folded back into `down`. `basis="cholesky"` takes S = the lower Cholesky factor of H (SVD-LLM), `"eigen"`
  takes S = Q Lambda^(1/2) from H = Q Lambda Q^T (EoRA). Both give the same optimum when H is positive
  definite; they differ only in how a singular H is handled (dampening, or clamping small eigenvalues).

All three are `Decomposition` (one SVD, truncated at any rank: ASVD's sensitivity sweep and LASER's search
reuse it). The singular values are split evenly between the factors (U sqrt(Sigma), sqrt(Sigma) V^T), as
ASVD's code does, so both factors have the same dynamic range when they are quantized afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from slimlm.errors import SlimlmError

Basis = Literal["cholesky", "eigen"]


def break_even_rank(in_features: int, out_features: int) -> float:
    """The rank at which two factors hold as many parameters as the dense weight: in out / (in + out)."""
    return in_features * out_features / (in_features + out_features)


def saves_parameters(rank: int, in_features: int, out_features: int) -> bool:
    return rank * (in_features + out_features) < in_features * out_features


def rank_for_kept_fraction(kept: float, in_features: int, out_features: int) -> int:
    """The rank whose factors hold `kept` of the dense weight's parameters (ASVD's `param_ratio`), floored."""
    return max(1, int(in_features * out_features * kept) // (in_features + out_features))


def check_rank(rank: int, in_features: int, out_features: int, name: str) -> None:
    if rank < 1:
        raise SlimlmError(f"{name}: rank must be at least 1 (got {rank})")
    if rank > min(in_features, out_features):
        raise SlimlmError(f"{name}: rank {rank} is above min(out, in) = {min(in_features, out_features)} of this "
                          f"{out_features} x {in_features} weight; choose a rank of at most that")


@dataclass
class Decomposition:
    """The SVD of W T, to truncate at any rank: T is nothing (plain SVD), a per-input-channel scale vector or a
    whitening matrix, and T^-1 (`back`) is folded into `down`. Singular values are split evenly."""

    U: Tensor
    sigma: Tensor
    Vh: Tensor
    back: Tensor | None  # T^-1: a vector (diagonal scaling), a matrix (whitening), or None

    @classmethod
    def of(cls, weight: Tensor, forward: Tensor | None = None, back: Tensor | None = None) -> Decomposition:
        weight = weight.double()
        if forward is not None:
            weight = weight * forward if forward.dim() == 1 else weight @ forward
        U, sigma, Vh = torch.linalg.svd(weight, full_matrices=False)
        return cls(U, sigma, Vh, back)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """(up, down) in float32: U_r Sigma_r^(1/2) and Sigma_r^(1/2) V_r^T T^-1."""
        root = self.sigma[:rank].sqrt()
        down = root[:, None] * self.Vh[:rank]
        if self.back is not None:
            down = down * self.back if self.back.dim() == 1 else down @ self.back
        return (self.U[:, :rank] * root).float(), down.float()


def truncated_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up, down) of the best rank-`rank` approximation of an (out, in) weight in Frobenius norm."""
    return Decomposition.of(weight).factors(rank)


def scaled_svd(weight: Tensor, scale: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up, down) with up @ down minimising ||(W - up down) diag(scale)||_F (scale > 0, one per input column)."""
    if not bool((scale > 0).all()):
        raise SlimlmError("the per-input-channel scales must be positive (an input channel that is always 0 "
                          "needs a small floor)")
    scale = scale.double()
    return Decomposition.of(weight, scale, 1 / scale).factors(rank)


def whitening(hessian: Tensor, basis: Basis, dampening: float = 0.0) -> tuple[Tensor, Tensor]:
    """(S, S^-1) with S S^T = H (+ dampening x mean diagonal), in float64.

    cholesky: the lower Cholesky factor; if H is not positive definite the dampening is raised tenfold
    from 1e-6 of the mean diagonal until it is (SVD-LLM adds a small diagonal the same way).
    eigen: Q Lambda^(1/2), eigenvalues clamped at 1e-10 of the largest (EoRA's code clamps them too)."""
    H = hessian.double()
    if not torch.isfinite(H).all():
        raise SlimlmError("the activation statistics hold NaN or infinity: check the model's outputs on the "
                          "calibration data (a float16 overflow?) before factorizing")
    identity = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean = float(torch.diag(H).mean().clamp_min(1e-30))
    if dampening:
        H = H + dampening * mean * identity
    if basis == "eigen":
        eigenvalues, Q = torch.linalg.eigh(H)
        eigenvalues = eigenvalues.clamp_min(float(eigenvalues.max().clamp_min(1e-30)) * 1e-10)
        root = eigenvalues.sqrt()
        return Q * root, (Q / root).T
    extra = 0.0
    for _ in range(12):
        S, info = torch.linalg.cholesky_ex(H + extra * mean * identity)
        if int(info) == 0:
            return S, torch.linalg.solve_triangular(S, identity, upper=False)
        extra = 1e-6 if extra == 0 else extra * 10
    raise SlimlmError("the activation second moment X X^T is not positive definite even with dampening; "
                      "calibrate on more tokens")


def whitened_svd(weight: Tensor, hessian: Tensor | None, rank: int, basis: Basis = "cholesky",
                 dampening: float = 0.0, whitener: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(up, down) with up @ down minimising ||(W - up down) X||_F, H = X X^T ((in, in), summed over tokens);
    `whitener` passes (S, S^-1) already computed from H (linears reading one input share it)."""
    S, S_inv = whitener if whitener is not None else whitening(hessian, basis, dampening)
    return Decomposition.of(weight, S, S_inv).factors(rank)


def output_error(delta: Tensor, hessian: Tensor | None) -> float:
    """||delta X||_F^2 = tr(delta H delta^T) for a weight change delta; ||delta||_F^2 when H is None."""
    delta = delta.double()
    if hessian is None:
        return float(delta.square().sum())
    return float(((delta @ hessian.double()) * delta).sum())


def low_rank_bytes(rank: int, in_features: int, out_features: int, bits: float = 16) -> int:
    return math.ceil(rank * (in_features + out_features) * bits / 8)
