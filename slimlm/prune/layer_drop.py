"""Layer removal: delete the least important decoder blocks (depth pruning).

Two block-importance criteria, each from its paper; the k least important blocks are removed in
one shot and the result is a plain, shallower transformers model (`save_pretrained` /
`from_pretrained` load it without slimlm):

- `angular` (ShortGPT: Men et al., "ShortGPT: Layers in Large Language Models are More Redundant
  Than You Expect", 2024, Eq. 1): Block Influence BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)], the mean
  cosine similarity between the hidden state entering block i and the one leaving it, over every
  calibration token; one dense pass through the blocks.
- `perplexity` (Shortened LLaMA: Kim et al., "Shortened LLaMA: Depth Pruning for LLMs", 2024,
  Sec. 3, the PPL criterion): the calibration perplexity of the model with block i alone removed;
  the blocks whose removal raises it least go. One full forward pass per block.
- `uniform` (no data): keep evenly spaced blocks, every k-th one when k divides the depth: the truncation
  that initialises a student from its teacher before distillation (Jha, Groeneveld, Strubell, Beltagy,
  "How To Train Your (Compressed) Large Language Model", 2023: truncate the teacher, then distil).

Removal renumbers each remaining attention's `layer_idx` (the KV cache is indexed by it) and
shortens `config.num_hidden_layers` and, where the config has one, `config.layer_types`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from transformers import PreTrainedModel

from slimlm.core.blocks import CompressionReport, dense_block_passes
from slimlm.core.stage import ModelContext, Stage, register
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter, text_config
from slimlm.models.loss import calibration_perplexity
from slimlm.progress import progress


@torch.no_grad()
def angular_importance(model: PreTrainedModel, adapter: ModelAdapter, calibration: torch.Tensor,
                       batch_size: int, device: torch.device) -> list[float]:
    """ShortGPT's Block Influence of every block (higher = more important)."""
    influence = []
    for _block, inputs, outputs in dense_block_passes(model, adapter, calibration, batch_size, device, "block influence"):
        similarity = sum(float(F.cosine_similarity(h.float(), o.float(), dim=-1).sum()) for h, o in zip(inputs.hidden, outputs))
        influence.append(1 - similarity / inputs.tokens)
    return influence


@torch.no_grad()
def perplexity_importance(model: PreTrainedModel, adapter: ModelAdapter, calibration: torch.Tensor,
                          batch_size: int, device: torch.device) -> list[float]:
    """Calibration perplexity with each block removed alone (higher = more important)."""
    parent = model.get_submodule(adapter.blocks_name.rpartition(".")[0])
    attribute = adapter.blocks_name.rpartition(".")[2]
    blocks = list(adapter.blocks)
    scores = []
    for index in progress(range(len(blocks)), desc="perplexity without each block", total=len(blocks)):
        setattr(parent, attribute, nn.ModuleList(blocks[:index] + blocks[index + 1 :]))
        try:
            scores.append(calibration_perplexity(model, calibration, batch_size, device))
        finally:
            setattr(parent, attribute, adapter.blocks)
    return scores


def uniform_importance(blocks: int, keep: int) -> list[float]:
    """1 for `keep` evenly spaced blocks (the first one included: every k-th block when k divides the depth),
    0 for the others: the truncation that initialises a student from its teacher without data."""
    kept = {int(i * blocks / keep) for i in range(keep)}
    return [1.0 if i in kept else 0.0 for i in range(blocks)]


def remove_blocks_(model: PreTrainedModel, adapter: ModelAdapter, indices: list[int]) -> None:
    """Delete the given blocks in place and make the config and the layers' indices agree."""
    drop = set(indices)
    kept = [block for i, block in enumerate(adapter.blocks) if i not in drop]
    parent_name, _, attribute = adapter.blocks_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = text_config(model)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
    config.num_hidden_layers = len(kept)


def drop_layers(model: PreTrainedModel, stage: DropLayersStage, calibration: torch.Tensor, batch_size: int,
                device: torch.device, report: CompressionReport) -> None:
    adapter = ModelAdapter(model)
    count = stage.blocks_to_remove(len(adapter))
    if stage.criterion == "uniform":
        importance = uniform_importance(len(adapter), len(adapter) - count)
    else:
        criterion = angular_importance if stage.criterion == "angular" else perplexity_importance
        importance = criterion(model, adapter, calibration, batch_size, device)
    removed = sorted(sorted(range(len(importance)), key=lambda i: importance[i])[:count])
    remove_blocks_(model, adapter, removed)
    report.structure.append({"method": "drop_layers", "criterion": stage.criterion, "importance": importance,
                             "removed_blocks": removed, "blocks_left": len(adapter) - count})


@register
class DropLayersStage(Stage):
    """Layer removal: the least important blocks go (ShortGPT's angular criterion or Shortened LLaMA's perplexity)."""

    method: Literal["drop_layers"] = "drop_layers"
    whole_model: ClassVar[bool] = True  # changes the architecture: runs before the block-by-block pass
    count: int | None = Field(None, ge=1, description="blocks to remove")
    ratio: float | None = Field(None, gt=0, lt=1, description="or: the fraction of blocks to remove")
    criterion: Literal["angular", "perplexity", "uniform"] = "angular"

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != "uniform"

    @model_validator(mode="after")
    def _count_or_ratio(self):
        if (self.count is None) == (self.ratio is None):
            raise ValueError("give exactly one of `count` (blocks to remove) and `ratio` (fraction of blocks)")
        return self

    def check(self, adapter, layers: dict[str, int]) -> None:
        self.blocks_to_remove(len(adapter))

    def blocks_to_remove(self, blocks: int) -> int:
        count = self.count if self.count is not None else round(self.ratio * blocks)
        if not 1 <= count < blocks:
            raise SlimlmError(f"drop_layers: cannot remove {count} of the model's {blocks} blocks; "
                              f"choose 1 to {blocks - 1}")
        return count

    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        drop_layers(context.model, self, context.calibration, context.batch_size, context.device, report)
