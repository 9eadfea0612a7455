"""What the factorization stages share: their size settings (a rank, or a fraction of parameters removed),
the check that fails before any work, the rule that a layer whose rank would not save parameters stays
dense, and the replacement of a linear by its `LowRankLinear`."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from slimlm.core.blocks import (
    CompressionReport,
    LayerReport,
    capture_block_inputs,
    linear_weight,
    replace_module,
    run_block,
)
from slimlm.core.stage import Stage
from slimlm.lowrank.factorize import break_even_rank, check_rank, rank_for_kept_fraction, saves_parameters
from slimlm.lowrank.layer import LowRankLinear
from slimlm.models.adapter import ModelAdapter, linear_shape
from slimlm.models.loss import calibration_perplexity, shifted_loss


class SizeFields(Stage):
    """A rank for every target linear, or a reduction (the subclass's field named by `reduction_field`)."""

    reduction_field: ClassVar[str]
    rank: int | None = Field(None, ge=1, description="the same rank for every target linear")

    @model_validator(mode="after")
    def _one_size(self):
        if (self.rank is None) == (getattr(self, self.reduction_field) is None):
            raise ValueError(f"give exactly one of rank (e.g. 64) or {self.reduction_field} (e.g. 0.2)")
        return self

    @property
    def needs_calibration(self) -> bool:
        return False

    def check(self, adapter: ModelAdapter, layers: dict[str, int]) -> None:
        if self.rank is not None:
            check_ranks(self, self.rank, adapter, layers)


class RankFields(SizeFields):
    """A rank for every target linear, or the fraction of each one's parameters to remove."""

    reduction_field: ClassVar[str] = "parameter_reduction"
    parameter_reduction: float | None = Field(
        None, gt=0, lt=1,
        description="fraction of each target linear's parameters removed (rank = (1 - it) m n / (m + n))")

    def layer_rank(self, in_features: int, out_features: int) -> int:
        if self.rank is not None:
            return self.rank
        return rank_for_kept_fraction(1 - self.parameter_reduction, in_features, out_features)


def install_factors(model: nn.Module, name: str, module: nn.Module, up: Tensor, down: Tensor) -> LowRankLinear:
    """Replace the float linear `name` by up @ down (its bias kept), in the linear's dtype."""
    weight = linear_weight(module)
    bias = getattr(module, "bias", None)
    layer = LowRankLinear.from_factors(up, down, None if bias is None else bias.detach().float())
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    replace_module(model, name, layer)
    return layer


class FactorizationLog:
    """Per-layer report lines and the stage's summary (`report.structure`): ranks, and the layers left dense."""

    def __init__(self, method: str):
        self.method, self.ranks, self.kept_dense = method, {}, {}
        self.parameters_before = self.parameters_after = 0

    def keeps_dense(self, name: str, rank: int, in_features: int, out_features: int, report: CompressionReport) -> bool:
        """True (and recorded) when `rank` would not save parameters: the layer stays dense."""
        if saves_parameters(rank, in_features, out_features):
            return False
        limit = break_even_rank(in_features, out_features)
        self.stays_dense(name, f"rank {rank} >= {limit:.1f} = m n / (m + n): no parameters saved", in_features,
                         out_features, report, label=f"rank {rank} saves nothing")
        return True

    def stays_dense(self, name: str, reason: str, in_features: int, out_features: int,
                    report: CompressionReport, label: str | None = None) -> None:
        """Record a layer left dense (its rank saves nothing, ASVD's sensitivity search, LASER, LPLR's bytes)."""
        self.parameters_before += in_features * out_features
        self.parameters_after += in_features * out_features
        self.kept_dense[name] = reason
        report.layers.append(LayerReport(name, f"{self.method} (kept dense: {label or reason})", 0.0))

    def factorized(self, name: str, rank: int, in_features: int, out_features: int, start: float, error: float,
                   report: CompressionReport) -> None:
        """Record a layer replaced by factors of `rank`."""
        self.parameters_before += in_features * out_features
        self.parameters_after += rank * (in_features + out_features)
        self.ranks[name] = rank
        report.layers.append(LayerReport(name, self.method, time.perf_counter() - start, error))

    def summarize(self, report: CompressionReport, **extra) -> None:
        unsaving = [name for name, reason in self.kept_dense.items() if "no parameters saved" in reason]
        if unsaving:
            names = ", ".join(unsaving[:3]) + (" ..." if len(unsaving) > 3 else "")
            print(f"{self.method}: {len(unsaving)} layer(s) kept dense, their rank would not save "
                  f"parameters ({names})", file=sys.stderr)
        report.structure.append({
            "method": self.method, "factorized": len(self.ranks), "kept_dense": self.kept_dense,
            "linear_parameters_before": self.parameters_before, "linear_parameters_after": self.parameters_after,
            "ranks": self.ranks, **extra})


def target_linears(model: nn.Module, stage: Stage) -> tuple[ModelAdapter, dict[str, nn.Module]]:
    """The model's adapter and the stage's selected block linears (a whole-model stage picks its own)."""
    from slimlm.compress.recipe import select_targets

    adapter = ModelAdapter(model)
    linears = adapter.linear_layers()
    return adapter, {name: linears[name] for name in select_targets(list(linears), stage)}


def block_of(adapter: ModelAdapter) -> dict[str, int]:
    """The block index of every block linear, by full name."""
    return {f"{adapter.blocks_name}.{block.index}.{path}": block.index
            for block in adapter for path in block.linear_names.values()}


def check_ranks(stage: Stage, rank: int, adapter: ModelAdapter, layers: dict[str, int]) -> None:
    """Fail before any work if `rank` is above min(out, in) of a selected linear."""
    shapes = adapter.linear_layers()
    for name in layers:
        in_features, out_features = linear_shape(shapes[name])
        check_rank(rank, in_features, out_features, f"{stage.method} {name}")


class TailPerplexity:
    """Calibration perplexity of the model when only block `index` onward changed, without rerunning the
    blocks before it: what enters each block on the uncompressed model is kept once, and an evaluation runs
    the remaining blocks, the final norm and the head. The shortcut is checked once against the full forward
    pass (a model whose head does more than norm + linear, e.g. logit soft-capping, gets the full pass)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, tokens: Tensor, batch_size: int):
        self.model, self.tokens, self.batch_size = model, tokens, batch_size
        self.adapter = ModelAdapter(model)
        device = next(model.parameters()).device
        inputs = capture_block_inputs(model, self.adapter, tokens, batch_size, device)
        self.entering = []
        for block in self.adapter.blocks:
            self.entering.append(inputs)
            inputs = inputs.following(run_block(block, inputs))
        full = calibration_perplexity(model, tokens, batch_size)
        self.exact = math.isclose(self._ppl_from(0), full, rel_tol=1e-4)

    @torch.no_grad()
    def _ppl_from(self, index: int) -> float:
        inputs = self.entering[index]
        for block in list(self.adapter.blocks)[index:]:
            inputs = inputs.following(run_block(block, inputs))
        total, count, start = 0.0, 0, 0
        for hidden in inputs.hidden:
            labels = self.tokens[start : start + hidden.shape[0]].to(hidden.device)
            start += hidden.shape[0]
            loss = shifted_loss(self.adapter.lm_head(self.adapter.final_norm(hidden)), labels, reduction="sum")
            total, count = total + float(loss), count + labels[:, 1:].numel()
        return math.exp(total / count)

    @torch.no_grad()
    def __call__(self, block_index: int) -> float:
        if not self.exact:
            return calibration_perplexity(self.model, self.tokens, self.batch_size)
        return self._ppl_from(block_index)


def read_cache(path: str | None, key: str) -> dict | None:
    """What a search saved ({"sweep": {layer: {fraction: perplexity}}, ...}) if the file exists and was
    made for `key`."""
    if path is None or not Path(path).is_file():
        return None
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != key:
        return None
    saved["sweep"] = {name: {float(f): ppl for f, ppl in row.items()} for name, row in saved["sweep"].items()}
    return saved


def write_cache(path: str | None, key: str, sweep: dict, **extra) -> None:
    """Save a sweep (and `extra` JSON fields) atomically (temporary file, then rename) under `key`."""
    if path is None:
        return
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(handle, "w") as file:
        json.dump({"key": key, "sweep": sweep, **extra}, file)
    os.replace(temporary, target)
