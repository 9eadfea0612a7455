"""Method registry: recipe `method` name -> the function that processes one block, and planners
that need a look at the whole model before the block-by-block pass (OWL's per-block sparsity)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from slimlm.compress.engine import BlockInputs, BlockMethod
from slimlm.compress.recipe import StageBase
from slimlm.models.adapter import ModelAdapter
from slimlm.prune.dsnot import dsnot_block
from slimlm.prune.flap import flap
from slimlm.prune.layer_drop import drop_layers
from slimlm.prune.llm_pruner import llm_pruner
from slimlm.prune.magnitude import magnitude_block
from slimlm.prune.owl import plan_owl
from slimlm.prune.slicegpt import slicegpt
from slimlm.prune.sparsegpt import sparsegpt_block
from slimlm.prune.wanda import wanda_block
from slimlm.quant.awq import awq_block
from slimlm.quant.gptq import gptq_block
from slimlm.quant.llm_fp4 import llm_fp4_block
from slimlm.quant.omniquant import omniquant_block
from slimlm.quant.rtn import rtn_block
from slimlm.quant.smoothquant import smoothquant_block
from slimlm.quant.zeroquant import zeroquant_block

METHOD_FUNCTIONS: dict[str, BlockMethod] = {
    "rtn": rtn_block, "smoothquant": smoothquant_block, "zeroquant": zeroquant_block, "gptq": gptq_block, "awq": awq_block,
    "omniquant": omniquant_block, "llm_fp4": llm_fp4_block,
    "magnitude": magnitude_block, "wanda": wanda_block, "sparsegpt": sparsegpt_block, "dsnot": dsnot_block,
}

# Stages that change the architecture run on the whole model before the block-by-block pass.
STRUCTURAL_FUNCTIONS = {"drop_layers": drop_layers, "llm_pruner": llm_pruner, "slicegpt": slicegpt, "flap": flap}


def plan_stage(model: PreTrainedModel, adapter: ModelAdapter, stage: StageBase, selected: set[str],
               inputs: BlockInputs | None, device: torch.device) -> list[float] | None:
    """Per-block sparsity for a pruning stage with OWL; None for every other stage."""
    if getattr(stage, "owl", None) is None:
        return None
    return plan_owl(model, adapter, stage, selected, inputs, device)
