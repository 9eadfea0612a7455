"""LASER: layer-selective rank reduction (Sharma, Ash and Misra, "The Truth is in There: Improving Reasoning in
Language Models with Layer-Selective Rank Reduction", ICLR 2024, arXiv:2312.13558).

An intervention (tau, l, rho) replaces the weight of matrix type tau (q, k, v, o, gate, up, down) in block l by
its rank-floor(rho d) truncated SVD, d = min(out, in) its maximal rank (Sec. 3). The search (Sec. 4):

1. every single intervention over `blocks` x `matrices` x `keep_fractions` (the paper's rho grid 0.9, 0.8,
   0.6, 0.4, 0.2, 0.1, 0.05, 0.01) is scored by the held-out perplexity of the model with only that
   reduction, on `samples` segments of the run's calibration tokens (choose a validation split for them, e.g.
   `calibration: {corpus: wikitext2}`, which is WikiText-2's validation set);
2. each (block, matrix) keeps its best rho; those that do not raise perplexity by more than `tolerance`
   (relative; 0: they must not hurt) are composed greedily, best first, as the paper composes reductions across
   layers (Sec. 5.1): a reduction stays only if the model with it and every reduction kept so far is no worse
   than without it (`tolerance` widens only the first filter, never the composition).

The report lists every kept reduction with its perplexity. Deviation: the paper scores on a task's validation
accuracy and loss; here on perplexity only. A kept reduction whose rank would not save parameters (rho above
m n / ((m + n) d)) is stored as the dense rank-r matrix W_r (same behaviour, no extra parameters) and said so;
the others become `LowRankLinear`s.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from slimlm.core.blocks import CompressionReport, LayerReport, linear_weight, replace_module
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
from slimlm.lowrank.factorize import Decomposition, saves_parameters
from slimlm.models.adapter import linear_shape
from slimlm.models.loss import calibration_perplexity
from slimlm.progress import progress

KEEP_FRACTIONS = (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01)  # the paper's rho grid
MATRICES = ("q", "k", "v", "o", "gate", "up", "down", "qkv")


@register
class LASERStage(Stage):
    """LASER: search single rank reductions on held-out perplexity, keep those that do not hurt."""

    method: Literal["laser"] = "laser"
    whole_model: ClassVar[bool] = True
    blocks: list[int] | None = Field(
        None, description="block indices to search (negative counts from the end); all if null")
    matrices: list[Literal["q", "k", "v", "o", "gate", "up", "down", "qkv"]] = Field(
        default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"], min_length=1)
    keep_fractions: list[float] = Field(default_factory=lambda: list(KEEP_FRACTIONS), min_length=1)
    samples: int = Field(8, ge=1, description="calibration segments scoring each reduction")
    tolerance: float = Field(0.0, ge=0, description="relative perplexity increase a kept reduction may cost")
    search_cache: str | None = Field(None, description="JSON file keeping the single-reduction sweep")

    @field_validator("keep_fractions")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        for value in values:
            if not 0 < value < 1:
                raise ValueError(f"every keep fraction rho must lie strictly between 0 and 1 (got {value})")
        return sorted(set(values), reverse=True)

    @torch.no_grad()
    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        if context.calibration is None:
            raise SlimlmError("laser scores reductions on held-out tokens: the run needs calibration data")
        model, tokens = context.model, context.calibration[: self.samples]
        adapter, linears = target_linears(model, self)
        candidates = self._candidates(adapter, linears)
        baseline = calibration_perplexity(model, tokens, context.batch_size)
        sweep = self._sweep(model, tokens, context.batch_size, candidates, linears, block_of(adapter))
        best = {name: min(row.items(), key=lambda item: item[1]) for name, row in sweep.items()}
        order = sorted((item for item in best.items() if item[1][1] <= baseline * (1 + self.tolerance)),
                       key=lambda item: item[1][1])
        current, kept, log = baseline, [], FactorizationLog("laser")
        originals = {}
        for name, (fraction, single) in progress(order, desc="laser compose", total=len(order)):
            module = linears[name]
            originals[name] = module
            self._reduce(model, name, module, fraction)
            trial = calibration_perplexity(model, tokens, context.batch_size)
            if trial <= current:  # composed greedily: a reduction stays only if it does not hurt
                current = trial
                kept.append({"module": name, "matrix": candidates[name], "keep_fraction": fraction,
                             "rank": _rank(module, fraction), "single_ppl": single, "composed_ppl": trial})
            else:
                replace_module(model, name, module)
        self._finish(model, kept, originals, log, report)
        log.summarize(report, baseline_ppl=baseline, final_ppl=current, searched=sum(map(len, sweep.values())),
                      kept=kept)

    def _candidates(self, adapter, linears: dict[str, nn.Module]) -> dict[str, str]:
        """{linear name: matrix type} of the searched (block, matrix) pairs."""
        count = len(adapter)
        chosen = None if self.blocks is None else {b % count for b in self.blocks}
        if self.blocks is not None and any(not -count <= b < count for b in self.blocks):
            raise SlimlmError(f"laser: blocks {self.blocks} include an index outside this {count}-block model")
        found = {}
        for block in adapter:
            if chosen is not None and block.index not in chosen:
                continue
            prefix = f"{adapter.blocks_name}.{block.index}."
            for role in self.matrices:
                name = prefix + block.linear_names.get(role, "\0")
                if name in linears:
                    found[name] = role
        if not found:
            raise SlimlmError(f"laser: blocks {self.blocks} x matrices {self.matrices} select no target linear")
        return found

    def _sweep(self, model, tokens, batch_size, candidates: dict[str, str], linears,
               blocks: dict[str, int]) -> dict[str, dict[float, float]]:
        key = self._cache_key(tokens, candidates, linears)
        cached = read_cache(self.search_cache, key)
        if cached is not None:
            return cached["sweep"]
        sweep, tail = {}, TailPerplexity(model, tokens, batch_size)
        total = len(candidates) * len(self.keep_fractions)
        for name in progress(candidates, desc=f"laser search ({total} evaluations)", total=len(candidates)):
            module = linears[name]
            decomposition = Decomposition.of(linear_weight(module).detach().float())
            sweep[name] = {}
            for fraction in self.keep_fractions:
                up, down = decomposition.factors(_rank(module, fraction))
                install_factors(model, name, module, up, down)
                try:
                    sweep[name][fraction] = tail(blocks[name])
                finally:
                    replace_module(model, name, module)
        write_cache(self.search_cache, key, sweep)
        return sweep

    def _reduce(self, model, name: str, module: nn.Module, fraction: float) -> None:
        up, down = Decomposition.of(linear_weight(module).detach().float()).factors(_rank(module, fraction))
        install_factors(model, name, module, up, down)

    def _finish(self, model, kept: list[dict], originals: dict, log: FactorizationLog, report) -> None:
        """Kept reductions that save parameters stay factorized; the others become the dense W_r."""
        for entry in kept:
            name, module = entry["module"], originals[entry["module"]]
            start = time.perf_counter()
            in_features, out_features = linear_shape(module)
            rank = entry["rank"]
            if saves_parameters(rank, in_features, out_features):
                log.factorized(name, rank, in_features, out_features, start, entry["composed_ppl"], report)
                continue
            layer = model.get_submodule(name)
            weight = linear_weight(module)
            weight.copy_(layer.correction().to(weight.dtype))
            replace_module(model, name, module)
            log.stays_dense(name, f"rank {rank} would not save parameters: stored as the dense rank-{rank} matrix",
                            in_features, out_features, report)
            entry["stored"] = "dense W_r"
        if not kept:
            report.layers.append(LayerReport("-", "laser (no reduction kept: none improved held-out perplexity)", 0.0))

    def _cache_key(self, tokens, candidates: dict[str, str], linears) -> str:
        digest = hashlib.sha256(tokens.cpu().numpy().tobytes())
        digest.update(json.dumps([self.keep_fractions, list(candidates)]).encode())
        for name in candidates:
            digest.update(linear_weight(linears[name]).detach().float().cpu().numpy().tobytes()[:4096])
        return digest.hexdigest()


def _rank(module: nn.Module, fraction: float) -> int:
    in_features, out_features = linear_shape(module)
    return max(1, int(fraction * min(in_features, out_features)))
