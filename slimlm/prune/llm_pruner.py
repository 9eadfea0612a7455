"""LLM-Pruner: structural pruning of coupled structures with first-order Taylor importance.

Ma, Fang, Wang, "LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS 2023
(arXiv:2305.11627). Implemented for decoders with separate q/k/v/o and up/down (and gate)
projections (Llama, Qwen2, Mistral, Gemma families):

- discovery (Sec. 3.1): the coupled groups are fixed by the architecture. An attention group is
  one key/value head with the query heads that read it (grouped-query attention: a KV head and its
  `num_attention_heads / num_key_value_heads` query heads) and the matching input columns of o,
  or (`attention_unit: query_head`) one query head with its o columns, the same number removed
  from every KV group; an MLP group is one intermediate channel: row c of gate and up, column c
  of down;
- estimation (Sec. 3.2, Eq. 4-5): gradients of the language-model loss on the calibration
  segments; element-wise importance |dL/dW_k * W_k| (first-order Taylor) summed over the group's
  weights (`aggregation`: sum, mean, max or prod as in the authors' code), or vector-wise
  |sum_k dL/dW_k * W_k| per weight vector, then aggregated;
- pruning: in every block the same fraction (`ratio`) of attention groups and of MLP channels
  with the lowest importance is removed (the paper's block-wise setting), the linears rebuilt
  smaller, and the config's head and width counts updated, so the result is a plain, smaller
  transformers model;
- recovery (Sec. 3.3): optional LoRA fine-tuning (`recovery:`), merged back into the weights.

Deviations: the authors' code leaves the first and last few blocks unpruned; every block is
pruned here, because transformers configs hold one head count and one MLP width for all blocks
(a checkpoint with per-block widths would not load with plain `from_pretrained`). The second-order
(Fisher) term of Eq. 5 is not computed. LoRA recovery trains on the calibration segments.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from slimlm.core.blocks import CompressionReport
from slimlm.core.stage import ModelContext, Stage, register
from slimlm.errors import SlimlmError
from slimlm.finetune.lora import LoRARecovery, add_lora, merge_lora_, train_lora
from slimlm.models.adapter import BlockAdapter, ModelAdapter
from slimlm.models.loss import next_token_loss
from slimlm.progress import progress
from slimlm.prune.common import attention_shape, prune_block_, require_separate_projections, set_block_shape_


def accumulate_gradients(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """dL/dW of the mean next-token loss over the calibration segments, left in each weight's .grad."""
    model.zero_grad(set_to_none=True)
    batches = range(0, len(calibration), batch_size)
    for start in progress(batches, desc="LLM-Pruner gradients", total=len(batches)):
        loss = next_token_loss(model, calibration[start : start + batch_size].to(device), reduction="sum")
        (loss / (len(calibration) * (calibration.shape[1] - 1))).backward()


def _aggregate(parts: list[torch.Tensor], how: str) -> torch.Tensor:
    """Combine per-group importance parts (each (groups,)) as the authors' `group_reduction`."""
    stacked = torch.stack(parts)
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    return stacked.prod(0)


def _importance(weight: torch.Tensor, groups: int, dim: int, vector_wise: bool) -> list[torch.Tensor]:
    """Importance of each of `groups` equal slices of `weight` along `dim` (0 = rows, 1 = columns)."""
    saliency = weight.detach().float() * weight.grad.float()
    slices = saliency.reshape(groups, -1, saliency.shape[1]) if dim == 0 else saliency.T.reshape(groups, -1, saliency.shape[0])
    if vector_wise:  # |g^T w| of each weight vector (a row, or a column), summed over the group's vectors
        return [slices.sum(dim=2).abs().sum(dim=1)]
    return [slices.abs().sum(dim=(1, 2))]


def group_importance(block: BlockAdapter, heads: int, kv_heads: int, stage: LLMPrunerStage) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance of each attention unit, importance of each MLP channel) from the gradients. The
    attention units are the KV groups (q, k, v rows and o columns of one KV head and its query heads)
    or, with `attention_unit: query_head`, the query heads (q rows and o columns of one head)."""
    vector = stage.importance == "vector"
    lin = block.linears
    for role in ("q", "k", "v", "o", "up", "down"):
        if lin[role].weight.grad is None:
            raise SlimlmError(f"block {block.index}: {block.linear_names[role]} got no gradient")
    if stage.attention_unit == "kv_group":
        parts = (_importance(lin["q"].weight, kv_heads, 0, vector) + _importance(lin["k"].weight, kv_heads, 0, vector)
                 + _importance(lin["v"].weight, kv_heads, 0, vector) + _importance(lin["o"].weight, kv_heads, 1, vector))
    else:
        parts = _importance(lin["q"].weight, heads, 0, vector) + _importance(lin["o"].weight, heads, 1, vector)
    width = lin["up"].weight.shape[0]
    mlp_parts = _importance(lin["up"].weight, width, 0, vector) + _importance(lin["down"].weight, width, 1, vector)
    if "gate" in lin:
        mlp_parts += _importance(lin["gate"].weight, width, 0, vector)
    return _aggregate(parts, stage.aggregation), _aggregate(mlp_parts, stage.aggregation)


def _keep_query_heads(importance: torch.Tensor, kv_heads: int, ratio: float) -> torch.Tensor:
    """Kept query heads (ascending): the same number removed from every KV group, so each KV head
    still serves an equal share of query heads (what grouped-query attention requires)."""
    per_group = len(importance) // kv_heads
    remove = min(per_group - 1, round(ratio * per_group))
    kept = [torch.argsort(importance[g * per_group : (g + 1) * per_group], descending=True)[: per_group - remove]
            + g * per_group for g in range(kv_heads)]
    return torch.sort(torch.cat(kept))[0]


def _keep(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (ascending) of the groups kept: all but the round(ratio * n) least important, at least one."""
    remove = min(len(importance) - 1, round(ratio * len(importance)))
    return torch.sort(torch.argsort(importance, descending=True)[: len(importance) - remove])[0]


def llm_pruner(model: PreTrainedModel, stage: LLMPrunerStage, calibration: torch.Tensor, batch_size: int,
               device: torch.device, report: CompressionReport) -> None:
    adapter = ModelAdapter(model)
    require_separate_projections(adapter, stage.method)
    heads, kv_heads, head_dim = attention_shape(model.config)
    before = sum(p.numel() for p in model.parameters())
    accumulate_gradients(model, calibration[: stage.gradient_samples], batch_size, device)
    per_group = heads // kv_heads
    with torch.no_grad():
        for block in adapter:
            attention, mlp = group_importance(block, heads, kv_heads, stage)
            if stage.attention_unit == "kv_group":
                kv_keep = _keep(attention, stage.ratio)
                q_keep = (kv_keep[:, None] * per_group + torch.arange(per_group)[None, :]).reshape(-1)
            else:
                kv_keep, q_keep = torch.arange(kv_heads), _keep_query_heads(attention, kv_heads, stage.ratio)
            channel_keep = _keep(mlp, stage.ratio)
            prune_block_(block, q_keep, kv_keep, channel_keep, head_dim)
    model.zero_grad(set_to_none=True)
    set_block_shape_(model, len(q_keep), len(kv_keep), len(channel_keep), head_dim)
    summary = {"method": "llm_pruner", "parameters_before": before, "kv_heads": [kv_heads, len(kv_keep)],
               "attention_heads": [heads, len(q_keep)], "mlp_width": [mlp.numel(), len(channel_keep)]}
    if stage.recovery is not None:
        r = stage.recovery
        add_lora(model, rank=r.rank, alpha=r.alpha, dropout=r.dropout)
        trained = train_lora(model, calibration, r.steps, r.batch_size, r.lr)
        merge_lora_(model)
        model.eval()
        summary["recovery"] = vars(trained)
    summary["parameters_after"] = sum(p.numel() for p in model.parameters())
    summary["parameter_reduction"] = 1 - summary["parameters_after"] / before
    report.structure.append(summary)


@register
class LLMPrunerStage(Stage):
    """LLM-Pruner (Ma et al., 2023): coupled attention groups and MLP channels by first-order Taylor importance."""

    method: Literal["llm_pruner"] = "llm_pruner"
    whole_model: ClassVar[bool] = True  # changes the architecture: runs before the block-by-block pass
    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of each block's KV-head groups and MLP channels removed")
    importance: Literal["element", "vector"] = "element"
    aggregation: Literal["sum", "mean", "max", "prod"] = "sum"
    attention_unit: Literal["kv_group", "query_head"] = Field(
        "kv_group", description="remove whole KV groups, or query heads (the same number in every group)")
    gradient_samples: int = Field(10, ge=1, description="calibration segments for the gradients (the paper: 10)")
    recovery: LoRARecovery | None = None

    def check(self, adapter, layers: dict[str, int]) -> None:
        require_separate_projections(adapter, self.method)

    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        llm_pruner(context.model, self, context.calibration, context.batch_size, context.device, report)
