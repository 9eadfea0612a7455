"""ASVD: activation-aware singular value decomposition, with sensitivity-based ranks, and its whitened form.

Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language Models"
(arXiv:2312.05821), as in the authors' code (hahnyuan/ASVD4LLM):

1. Activation-aware scaling (Sec. 3.2): S = diag(s), s_j = (mean over calibration tokens of |x_j|)^alpha.
   The SVD is taken of W S, and S^-1 is folded back into the right factor: W ~= (U_r Sigma_r^1/2)
   (Sigma_r^1/2 V_r^T S^-1), so input channels that carry large activations are truncated least.
   alpha: the paper fixes 0.5 after an ablation; with `alpha: null` (the default here, as the issue asks for a
   search) each layer takes the alpha of `alpha_grid` whose truncations at the ranks of `ratio_candidates` have
   the smallest mean log output error tr(dW H dW^T) on the calibration inputs (H = X X^T, one block at a time).
2. Sensitivity-based truncation rank search (STRS, Sec. 3.3; `sensitivity.py` and `binary_search.py`): for
   every target linear and every kept-parameter fraction in `ratio_candidates` (0.1 ... 0.9), the perplexity of
   the model with only that linear truncated, on `sensitivity_samples` calibration segments. The (layer,
   fraction) pairs are sorted by that perplexity; a binary search finds the largest set of the least harmful
   pairs whose union (each layer at the smallest fraction it is allowed) meets the parameter target, and each
   layer takes that fraction (a layer with no pair in the set stays dense). Deviation: the reference code's
   search counts numel x fraction parameters and keeps its last midpoint; here the factors' real sizes are
   counted and the search returns the least compression that meets the target.
3. `scaling: whitening` replaces step 1 by SVD-LLM's truncation-aware data whitening (Wang et al.,
   arXiv:2403.07378, Sec. 3.1; ASVD's `asvd_whitening.py` uses it too): S = the Cholesky factor of X X^T, so
   that the truncated singular values are exactly the loss ||(W - W_r) X||_F (`slimlm.lowrank.factorize`).

`parameter_reduction` is the fraction of the target linears' parameters removed model-wide (`ranks:
sensitivity`), or from each linear (`ranks: uniform`, SVD-LLM's allocation). The calibration statistics are
those of the uncompressed model (one pass, as in both papers). The sensitivity sweep (layers x candidates
forward passes) is the long part: `sensitivity_cache` names a JSON file that keeps it, so another target or
an interrupted run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from slimlm.core.blocks import CompressionReport, block_targets, dense_block_passes, linear_weight, replace_module
from slimlm.core.hessian import SharedHessians, SharedInputs
from slimlm.core.stage import ModelContext, Stage, register
from slimlm.errors import SlimlmError
from slimlm.lowrank.common import (
    FactorizationLog,
    TailPerplexity,
    block_of,
    install_factors,
    read_cache,
    target_linears,
    write_cache,
)
from slimlm.lowrank.factorize import Decomposition, output_error, rank_for_kept_fraction, saves_parameters, whitening
from slimlm.models.adapter import ModelAdapter, linear_shape
from slimlm.progress import progress

RATIO_CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # ASVD's `param_ratio_candidates`


class AbsoluteMean:
    """Mean |x_j| over every calibration token, per input channel."""

    def __init__(self, in_features: int):
        self.sum, self.tokens = torch.zeros(in_features, dtype=torch.float64), 0

    def add_batch(self, inputs: Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        self.sum += x.abs().sum(0).double().cpu()
        self.tokens += x.shape[0]

    def result(self) -> Tensor:
        if self.tokens == 0:
            raise SlimlmError("no calibration inputs reached this layer: is it used in the forward pass?")
        return self.sum / self.tokens


@register
class ASVDStage(Stage):
    """ASVD (Yuan et al., 2023): activation-scaled SVD with sensitivity-based ranks; `scaling: whitening` is
    SVD-LLM's exact-loss whitening."""

    method: Literal["asvd"] = "asvd"
    whole_model: ClassVar[bool] = True
    parameter_reduction: float = Field(..., gt=0, lt=1,
                                       description="fraction of the target linears' parameters removed")
    scaling: Literal["abs_mean", "whitening"] = Field("abs_mean",
                                                      description="activation scaling, or SVD-LLM whitening")
    alpha: float | None = Field(None, ge=0, le=4, description="scaling exponent; null: searched per layer")
    alpha_grid: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5], min_length=1)
    ranks: Literal["sensitivity", "uniform"] = Field(
        "sensitivity", description="STRS allocation, or the same fraction per layer")
    ratio_candidates: list[float] = Field(default_factory=lambda: list(RATIO_CANDIDATES), min_length=1)
    sensitivity_samples: int = Field(8, ge=1, description="calibration segments for the sensitivity perplexities")
    sensitivity_cache: str | None = Field(
        None, description="JSON file keeping the sensitivity sweep (reused when it matches)")

    @field_validator("ratio_candidates", "alpha_grid")
    @classmethod
    def _in_range(cls, values: list[float], info) -> list[float]:
        for value in values:
            if info.field_name == "ratio_candidates" and not 0 < value < 1:
                raise ValueError(f"every kept fraction must lie strictly between 0 and 1 (got {value})")
            if info.field_name == "alpha_grid" and not 0 <= value <= 4:
                raise ValueError(f"every alpha must lie in [0, 4] (got {value})")
        return sorted(set(values))

    @torch.no_grad()
    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        if context.calibration is None:
            raise SlimlmError("asvd needs calibration data")
        model = context.model
        adapter, linears = target_linears(model, self)
        key = self._cache_key(context.calibration, linears)
        cached = read_cache(self.sensitivity_cache, key)  # the sweep and the searched alphas of an earlier run
        transforms, alphas = self._collect(context, adapter, linears, cached.get("alphas") if cached else None)
        if self.ranks == "uniform":
            kept = {name: 1 - self.parameter_reduction for name in linears}
        else:
            if cached is not None:
                sensitivity = cached["sweep"]
            else:
                sensitivity = self._sensitivity(context, block_of(adapter), linears, transforms)
                write_cache(self.sensitivity_cache, key, sensitivity, alphas=alphas)
            kept = allocate(sensitivity, {name: linear_shape(m) for name, m in linears.items()},
                            1 - self.parameter_reduction)
        log = FactorizationLog(f"asvd-{self.scaling}")
        for name, module in progress(linears.items(), desc="asvd factorize", total=len(linears)):
            start = time.perf_counter()
            in_features, out_features = linear_shape(module)
            fraction = kept.get(name, 1.0)
            if fraction >= 1:
                log.stays_dense(name, "the sensitivity search keeps it dense", in_features, out_features, report)
                continue
            rank = rank_for_kept_fraction(fraction, in_features, out_features)
            if log.keeps_dense(name, rank, in_features, out_features, report):
                continue
            weight = linear_weight(module).detach().float()
            up, down = Decomposition.of(weight, *transforms[name]).factors(rank)
            install_factors(model, name, module, up, down)
            log.factorized(name, rank, in_features, out_features, start, output_error(weight - up @ down, None), report)
        log.summarize(report, alphas=alphas, kept_fractions=kept)

    def _collect(self, context: ModelContext, adapter: ModelAdapter, linears: dict[str, nn.Module],
                 known_alphas: dict[str, float] | None) -> tuple[dict, dict]:
        """One pass of the uncompressed model: per target linear, (T, T^-1) and the chosen alpha (searched
        unless `known_alphas`, from the cache of a run on the same model and tokens, has it)."""
        whitened = self.scaling == "whitening"
        means = None if whitened else SharedInputs(AbsoluteMean)
        search = not whitened and self.alpha is None and not known_alphas
        hessians = SharedHessians(device="cpu", dtype=torch.float64) if whitened or search else None
        selected = set(linears)

        def pre_hooks(block):
            targets = block_targets(adapter, block.index, self, selected)
            return [(block.linears[role], _sink(name, means, hessians)) for name, role in targets.items()]

        transforms, alphas = {}, {}
        passes = dense_block_passes(context.model, adapter, context.calibration, context.batch_size,
                                    context.device, "asvd statistics", pre_hooks)
        for block, _inputs, _outputs in passes:
            # Linears reading one input (q, k, v) share one Hessian tensor and so one factorization; the
            # tensors stay referenced here while the block is processed, so their ids cannot be reused.
            whiteners: dict[int, tuple[Tensor, tuple[Tensor, Tensor]]] = {}
            for name in block_targets(adapter, block.index, self, selected):
                hessian = hessians.pop(name) if hessians is not None else None
                if self.scaling == "whitening":
                    if id(hessian) not in whiteners:
                        whiteners[id(hessian)] = (hessian, whitening(hessian, "cholesky"))
                    transforms[name] = whiteners[id(hessian)][1]
                    continue
                mean = means.pop(name).result()
                if self.alpha is not None:
                    alpha = self.alpha
                elif known_alphas:
                    alpha = known_alphas[name]
                else:
                    weight = linear_weight(linears[name]).detach().double().cpu()
                    alpha = self._search_alpha(weight, mean, hessian)
                scale = mean.pow(alpha) + 1e-6  # ASVD adds 1e-6 so a dead channel does not divide by zero
                transforms[name], alphas[name] = (scale, 1 / scale), alpha
        return transforms, alphas

    def _search_alpha(self, weight: Tensor, mean: Tensor, hessian: Tensor) -> float:
        """The alpha of the grid whose truncations change the layer's outputs least: the smallest mean log
        output error tr(dW H dW^T) over the ranks of `ratio_candidates` (independent of the target, so one
        sensitivity sweep serves every parameter target)."""
        out_features, in_features = weight.shape
        ranks = sorted({rank_for_kept_fraction(f, in_features, out_features) for f in self.ratio_candidates})
        best, best_score = self.alpha_grid[0], math.inf
        for alpha in self.alpha_grid:
            scale = mean.pow(alpha) + 1e-6
            decomposition = Decomposition.of(weight, scale, 1 / scale)
            score = 0.0
            for rank in ranks:
                up, down = decomposition.factors(rank)
                score += math.log(max(output_error(weight - up.double() @ down.double(), hessian), 1e-300))
            if score < best_score:
                best, best_score = alpha, score
        return best

    def _sensitivity(self, context: ModelContext, blocks: dict[str, int], linears: dict[str, nn.Module],
                     transforms: dict) -> dict:
        """{layer: {kept fraction: calibration perplexity with only that layer truncated}}."""
        tokens = context.calibration[: self.sensitivity_samples]
        sensitivity, tail = {}, TailPerplexity(context.model, tokens, context.batch_size)
        total = len(linears) * len(self.ratio_candidates)
        bar = progress(((n, m) for n, m in linears.items()), desc=f"asvd sensitivity ({total} evaluations)",
                       total=len(linears))
        for name, module in bar:
            weight = linear_weight(module).detach().float()
            decomposition = Decomposition.of(weight, *transforms[name])
            in_features, out_features = linear_shape(module)
            sensitivity[name] = {}
            for fraction in self.ratio_candidates:
                rank = rank_for_kept_fraction(fraction, in_features, out_features)
                install_factors(context.model, name, module, *decomposition.factors(rank))
                try:
                    sensitivity[name][fraction] = tail(blocks[name])
                finally:
                    replace_module(context.model, name, module)
        return sensitivity

    def _cache_key(self, calibration: Tensor, linears: dict[str, nn.Module]) -> str:
        """What the sweep and the alphas depend on: the calibration tokens, the settings, the weights."""
        digest = hashlib.sha256(calibration.cpu().numpy().tobytes())
        digest.update(json.dumps([self.scaling, self.alpha, self.alpha_grid, self.ratio_candidates,
                                  self.sensitivity_samples, list(linears)]).encode())
        for module in linears.values():  # the weights themselves: another model never matches
            digest.update(linear_weight(module).detach().float().cpu().numpy().tobytes()[:4096])
        return digest.hexdigest()


def _sink(name: str, means: SharedInputs | None, hessians: SharedHessians | None):
    def hook(_module, args):
        if means is not None:
            means.add(name, args[0])
        if hessians is not None:
            hessians.add(name, args[0])
    return hook


def allocate(sensitivity: dict[str, dict[float, float]], shapes: dict[str, tuple[int, int]],
             kept: float) -> dict[str, float]:
    """STRS: the kept fraction of each layer, least compression meeting `kept` of the layers' parameters."""
    entries = sorted(((ppl, name, fraction) for name, row in sensitivity.items() for fraction, ppl in row.items()),
                     key=lambda entry: -entry[0])  # most harmful first
    dense = sum(i * o for i, o in shapes.values())
    target = kept * dense

    def fractions(mid: int) -> dict[str, float]:
        chosen = dict.fromkeys(shapes, 1.0)
        for _ppl, name, fraction in entries[mid:]:
            chosen[name] = min(chosen[name], fraction)
        return chosen

    def parameters(chosen: dict[str, float]) -> int:
        total = 0
        for name, (in_features, out_features) in shapes.items():
            rank = rank_for_kept_fraction(chosen[name], in_features, out_features) if chosen[name] < 1 else None
            saves = rank is not None and saves_parameters(rank, in_features, out_features)
            total += rank * (in_features + out_features) if saves else in_features * out_features
        return total

    if parameters(fractions(0)) > target:
        raise SlimlmError(f"asvd: even the smallest candidate fraction of every layer keeps more than {kept:.0%} of "
                          "the parameters; add smaller ratio_candidates or remove fewer parameters")
    low, high = 0, len(entries)  # parameters(fractions(mid)) grows with mid; find the largest feasible mid
    while low < high:
        mid = (low + high + 1) // 2
        if parameters(fractions(mid)) <= target:
            low = mid
        else:
            high = mid - 1
    return fractions(low)
