"""The engine feeds every block what the model's own forward feeds it: per-layer attention types (sliding
window or full attention, each with its own mask and rotary embedding) included."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch

from slimlm.compress import compress
from slimlm.core.blocks import BlockContext, CompressionReport, block_output, capture_block_inputs
from slimlm.core.stage import Stage, register
from slimlm.models.adapter import ModelAdapter
from slimlm.models.tiny import MIXED_ATTENTION, TINY_FAMILIES, tiny_model

CALIBRATION = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
BATCH = 4  # the last batch is smaller (2 segments)
ARCHITECTURES = [(family, MIXED_ATTENTION.get(family, {})) for family in TINY_FAMILIES]


@register
class RecordBlocksStage(Stage):
    """Changes nothing: records what enters each block and what leaves it, as the engine computes them."""

    method: Literal["test_record_blocks"] = "test_record_blocks"
    seen: ClassVar[dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        RecordBlocksStage.seen[context.index] = ([h.clone() for h in context.inputs.hidden], context.run())


def own_forward_blocks(model, adapter: ModelAdapter) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """What enters and leaves each block in the model's own forward, batch by batch as the engine batches."""
    seen = {i: ([], []) for i in range(len(adapter))}
    handles = []
    for i, block in enumerate(adapter.blocks):
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: seen[i][0].append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(block.register_forward_hook(lambda _m, _a, out, i=i: seen[i][1].append(block_output(out))))
    with torch.no_grad():
        for start in range(0, len(CALIBRATION), BATCH):
            model(input_ids=CALIBRATION[start : start + BATCH], use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize(("family", "overrides"), ARCHITECTURES, ids=[f for f, _ in ARCHITECTURES])
def test_the_engine_runs_every_block_bitwise_as_the_models_own_forward(family, overrides):
    model = tiny_model(family, blocks=4, **overrides)
    adapter = ModelAdapter(model)
    expected = own_forward_blocks(model, adapter)
    RecordBlocksStage.seen.clear()
    compress(model, {"stages": [{"method": "test_record_blocks"}], "calibration": {"batch_size": BATCH}},
             calibration=CALIBRATION)
    assert sorted(RecordBlocksStage.seen) == list(range(4))
    for index, (inputs, outputs) in RecordBlocksStage.seen.items():
        assert len(inputs) == len(expected[index][0]) == 2
        for got, want in zip(inputs + outputs, expected[index][0] + expected[index][1]):
            assert torch.equal(got, want), f"block {index}"


@pytest.mark.parametrize("family", sorted(MIXED_ATTENTION))
def test_layers_of_different_attention_types_get_their_own_arguments(family):
    """The check above can fail: these models give some blocks other arguments than block 0's, so block
    0's arguments reused for every block (what the engine did before) change some block's output."""
    model = tiny_model(family, blocks=4, **MIXED_ATTENTION[family])
    adapter = ModelAdapter(model)
    inputs = capture_block_inputs(model, adapter, CALIBRATION, BATCH, torch.device("cpu"))
    assert len(inputs.later) == 3
    changed = []
    with torch.no_grad():
        for index, (args, kwargs) in enumerate(inputs.later, start=1):
            own = block_output(adapter.blocks[index](inputs.hidden[0], *args[0], **kwargs[0]))
            first = block_output(adapter.blocks[index](inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0]))
            changed.append(not torch.equal(own, first))
    assert any(changed) == (family != "mistral")  # Mistral's window applies to every layer alike


def test_capture_does_not_compute_the_blocks():
    model = tiny_model("llama", blocks=4)
    adapter = ModelAdapter(model)
    calls = []
    handles = [block.mlp.register_forward_hook(lambda *_: calls.append(1)) for block in adapter.blocks]
    capture_block_inputs(model, adapter, CALIBRATION, BATCH, torch.device("cpu"))
    for handle in handles:
        handle.remove()
    assert len(calls) == 1  # the first block once, to learn the form of a block's output
    assert "forward" not in vars(adapter.blocks[0])  # the blocks' own forward is back
