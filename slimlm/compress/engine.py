"""The compression engine: one sequential, block-by-block pass that every method runs in.

1. The calibration segments run through the model's own forward, with the blocks passing their input
   through: the hidden states entering the first block are kept, and for every block the other
   arguments the model passes it (attention mask, rotary position embeddings, ...). Layers of
   different attention types (Gemma 2/3 sliding-window and full attention, Qwen2's layers past
   max_window_layers) get different masks and rotary embeddings, so each block is later run with its own.
2. For each block in order, each stage of the recipe processes it: a method attaches hooks to the
   block's linears to gather what it needs (the input Hessian X^T X for GPTQ, activation
   statistics and inputs for AWQ), runs the block on the cached inputs, and replaces or rewrites
   the linears.
3. The compressed block then runs once more on the cached inputs, and its outputs become the next
   block's inputs (true-sequential methods take them from their own pass instead, `slimlm.core.sequential`).
   Each block is therefore calibrated on the activations of the already-compressed model, so the error of
   earlier blocks is accounted for, as in the GPTQ reference code.

Stages that change the architecture (`whole_model = True`: layer removal, SliceGPT, ...) run first, on
the whole model, each on what the previous one left; the pass above then runs on the smaller model.
Training stages (`after_blocks = True`: distillation, fine-tuning) run last, on the compressed model, with
a copy of the model as it was before the recipe as their teacher.
A stage may plan per block from a look at the whole model first (`Stage.plan`: OWL's sparsities).

The engine knows methods only through the interface in `slimlm.core.stage` and finds them through
the registry (`slimlm.core.registry`); the pieces of the pass that methods use themselves (block
inputs, the block context, the report) live in `slimlm.core.blocks`.

Memory: only the block being processed needs to sit on the compute device (`device`); the rest of
the model stays where it is (CPU RAM). Working memory is about

    2 * N * L * d * 4 bytes            (block inputs and outputs, float32, N segments of L tokens, width d)
  + one block's weights
  + sum over the block's linears of in_features^2 * 4 bytes   (Hessians; GPTQ, one sequential group at a time)
  + the activations of one forward pass of `calibration.batch_size` segments through one block
  + 2 * N * L * d * 4 bytes          (true-sequential methods, GPTQ: o's inputs, then the residual stream
                                      entering the MLP, so that every linear runs once: `slimlm.core.sequential`)
  + N * L * d_mlp * 4 bytes          (the same: down's inputs, kept only while they take at most half of the
                                      free memory; otherwise the MLP half runs once more for the block's output)
  + one block's weights               (a copy of the block's weights as they were, when a stage corrects the
                                      error of earlier stages: `Stage.needs_original_weights`, LoRC, EoRA).

For a 70B Llama (d = 8192, MLP width 28672, 80 blocks of about 1.7 GB in bfloat16) with 128 x 2048
calibration tokens: 2 * 128 * 2048 * 8192 * 4 B = 17 GB of cached activations, 1.7 GB of block
weights, and at most 28672^2 * 4 B = 3.3 GB for the largest Hessian: about 24 GB of GPU memory,
with the other 79 blocks in CPU RAM. Halve the first term by calibrating on fewer or shorter
segments, or keep the cache in bfloat16.
"""
from __future__ import annotations

import copy
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from slimlm.compress.recipe import Recipe, select_targets
from slimlm.compress.resume import BlockCheckpoint, fingerprint
from slimlm.core import distributed
from slimlm.core.blocks import (
    BlockContext,
    CompressionReport,
    block_targets,
    capture_block_inputs,
    on_device,
    original_block_weights,
    run_block,
)
from slimlm.core.memory import available_memory
from slimlm.core.stage import ModelContext
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter, linear_shape
from slimlm.progress import progress


def validate_recipe_for_model(model: PreTrainedModel, recipe: Recipe) -> tuple[ModelAdapter, list[set[str]]]:
    """Check every stage against the model before any work; returns the adapter and each stage's targets."""
    adapter = ModelAdapter(model)
    linears = adapter.linear_layers()
    names = list(linears)
    selections = []
    for stage in recipe.stages:
        chosen = select_targets(names, stage)
        stage.check(adapter, {name: linear_shape(linears[name])[0] for name in chosen})
        selections.append(set(chosen))
    return adapter, selections


@dataclass(frozen=True)
class MemoryEstimate:
    """The working memory of a compression run by the formula of the module docstring, in bytes."""

    model: int  # every parameter and buffer as loaded
    activations: int  # block inputs and outputs of every calibration segment, float32 (and what methods keep)
    block: int  # the largest block's weights (a copy where a stage keeps the original weights)
    hessians: int  # the largest (in_features^2) float32 matrix, once per linear of the widest sequential group
    forward: int  # one batch of segments through one block (MLP activations dominate)
    optional: int = 0  # kept only where it fits in half the free memory (GPTQ's down inputs): not in the refusal
    training: int = 0  # training stages: the teacher's copy, gradients and AdamW's two moments, one batch's logits

    runtime: int = 512 * 1024**2  # Python, PyTorch and the tokenizer (measured: about 0.4 GiB on CPU)

    @property
    def total(self) -> int:
        return (self.model + self.activations + self.block + self.hessians + self.forward + self.optional
                + self.training + self.runtime)

    def describe(self) -> str:
        parts = {"model": self.model, "cached activations": self.activations, "Hessians": self.hessians,
                 "block copies and one batch's forward": self.block + self.forward, "runtime": self.runtime}
        if self.optional:
            parts["kept where memory allows"] = self.optional
        if self.training:
            parts["training"] = self.training
        return f"about {_size(self.total)} (" + ", ".join(f"{k} {_size(v)}" for k, v in parts.items()) + ")"


def _size(count: int) -> str:
    return f"{count / 1024**3:.2f} GiB" if count >= 1024**3 else f"{count / 1024**2:.0f} MiB"


def estimate_memory(model: PreTrainedModel, recipe: Recipe) -> MemoryEstimate:
    """The engine's working memory for `recipe` on `model` (CPU runs: all of it in RAM)."""
    adapter = ModelAdapter(model)
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    blocks = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in adapter.blocks]
    widths = [linear_shape(m) for m in adapter.linear_layers().values()]  # (in, out)
    training = sum(_training_bytes(model, model_bytes, stage) for stage in recipe.stages if stage.after_blocks)
    if not recipe.needs_calibration:
        return MemoryEstimate(model_bytes, 0, max(blocks, default=0), 0, 0, training=training)
    c = recipe.calibration
    tokens = c.samples * c.seqlen
    width = adapter.embedding.weight.shape[1]
    widest_in = max((w[0] for w in widths), default=0)
    widest_out = max((w[1] for w in widths), default=0)
    keeps_original = any(stage.needs_original_weights for stage in recipe.stages)
    # inputs, outputs and one more stream; true-sequential GPTQ keeps o's inputs and then the residual stream
    # (`slimlm.core.sequential`), and down's inputs where they fit
    sequential = any(getattr(stage, "true_sequential", False) for stage in recipe.stages)
    streams = 4 if sequential else 3
    return MemoryEstimate(
        model=model_bytes,
        activations=streams * tokens * width * 4,
        block=max(blocks, default=0) * (2 if keeps_original else 1),
        hessians=3 * widest_in**2 * 4,
        forward=4 * c.batch_size * c.seqlen * max(widest_in, widest_out) * 4,
        optional=tokens * widest_in * 4 if sequential else 0,
        training=training)


def _training_bytes(model: PreTrainedModel, model_bytes: int, stage) -> int:
    """A training stage's memory: the teacher's copy, three float32 copies of the parameters (gradient, AdamW's
    moments; an upper bound when fewer train) and a batch's float32 logits for both models with their softmaxes."""
    teacher = model_bytes if stage.uses_teacher else 0
    parameters = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    logits = 6 * stage.training.batch_size * stage.seqlen * vocab * 4
    return teacher + 3 * parameters * 4 + logits


def check_memory(model: PreTrainedModel, recipe: Recipe, force: bool = False) -> MemoryEstimate:
    """The estimate; a `SlimlmError` when it exceeds the available RAM (the model is already loaded, so its
    share counts as available) unless `force`."""
    estimate = estimate_memory(model, recipe)
    free = available_memory()
    if free is not None and not force and estimate.total - estimate.model - estimate.runtime - estimate.optional > free:
        raise SlimlmError(f"this compression needs {estimate.describe()}, but only {_size(free)} of RAM is "
                          "available: calibrate on fewer or shorter segments (--calib-samples, --calib-seqlen), "
                          "or pass --force to try anyway")
    return estimate


def compress(
    model: PreTrainedModel,
    recipe: Recipe,
    calibration: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool | None = None,
) -> CompressionReport:
    """Apply `recipe` to `model` in place, block by block (see the module docstring).

    With `checkpoint_dir`, a checkpoint is written there after every block, and a checkpoint of the same run
    found there is continued (`slimlm.compress.resume`); `resume=True` requires one, `resume=False` discards
    it. The caller removes the folder once the result is saved."""
    start = time.perf_counter()
    adapter, selections = validate_recipe_for_model(model, recipe)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if recipe.needs_calibration and calibration is None:
        raise SlimlmError("this recipe needs calibration data: pass calibration=token ids of shape (samples, seqlen)")
    if calibration is not None and (calibration.dim() != 2 or calibration.dtype != torch.long):
        raise SlimlmError(f"calibration must be a 2-D tensor of token ids (got {tuple(calibration.shape)}, {calibration.dtype})")
    if distributed.active():  # this process calibrates on its share of the segments (slimlm.core.distributed)
        if checkpoint_dir is not None:
            raise SlimlmError("resumable checkpoints are not kept under torch.distributed: pass checkpoint_dir=None")
        distributed.check_recipe([stage.method for stage in recipe.stages],
                                 len(calibration) if calibration is not None else distributed.world_size())
        calibration = distributed.shard(calibration) if calibration is not None else None
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = BlockCheckpoint(checkpoint_dir, fingerprint(model, recipe.model_dump_json(), calibration, device))
    if checkpoint is not None and resume is False:
        checkpoint.remove()
    saved_state = checkpoint.found() if checkpoint is not None else None
    if resume and saved_state is None:
        raise SlimlmError(f"--resume: {checkpoint_dir or 'no checkpoint folder given'} holds no checkpoint of this "
                          "run (same model, recipe, calibration, machine and threads); run without --resume to "
                          "start from the first block")
    report = CompressionReport()
    was_training = model.training
    model.eval()
    after_blocks = [stage for stage in recipe.stages if stage.after_blocks]
    # distillation's teacher: the model before any stage (a resumed run reloads it, so this is the same model)
    teacher = copy.deepcopy(model) if any(stage.uses_teacher for stage in after_blocks) else None
    whole_model = [stage for stage in recipe.stages if stage.whole_model]
    for stage in whole_model:  # architecture changes first, each on the model the previous one left
        stage.apply(ModelContext(model, calibration, recipe.calibration.batch_size, device), report)
    full_recipe = recipe
    if whole_model or after_blocks:
        block_stages = [stage for stage in recipe.stages if not (stage.whole_model or stage.after_blocks)]
        if not block_stages:
            _train(model, full_recipe, after_blocks, calibration, device, teacher, checkpoint, report)
            return _finish(model, full_recipe, report, start, device, was_training)
        recipe = recipe.model_copy(update={"stages": block_stages})
        adapter, selections = validate_recipe_for_model(model, recipe)
    resumed = checkpoint.load(model, adapter, saved_state) if saved_state is not None else None
    if resumed is not None:
        report = resumed.report
        print(f"slimlm: resuming after block {resumed.next_block} of {len(adapter)} from {checkpoint.directory}",
              file=sys.stderr)
    inputs = None
    if recipe.needs_calibration:
        inputs = capture_block_inputs(model, adapter, calibration, recipe.calibration.batch_size, device)
        if resumed is not None:
            inputs = resumed.inputs(inputs, device)
        report.calibration_tokens = distributed.total(inputs.tokens)
    if resumed is not None:
        plans = resumed.plans
        torch.set_rng_state(resumed.rng_state)
    else:
        plans = [stage.plan(model, adapter, selected, inputs, device)
                 for stage, selected in zip(recipe.stages, selections)]
    report.block_sparsity = {i: plan for i, plan in enumerate(plans) if plan is not None}
    keep_originals = any(stage.needs_original_weights for stage in recipe.stages)
    first = resumed.next_block if resumed is not None else 0
    elapsed_before = resumed.elapsed if resumed is not None else 0.0
    for index in progress(range(first, len(adapter)), desc="compress blocks", total=len(adapter) - first):
        block = adapter.blocks[index]
        with on_device([block], device):
            next_hidden = None
            originals = original_block_weights(adapter, index) if keep_originals else None
            for stage, selected, plan in zip(recipe.stages, selections, plans):
                targets = block_targets(adapter, index, stage, selected)
                if targets:
                    context = BlockContext(model, adapter, index, block, targets, inputs, device,
                                           plan=plan[index] if plan is not None else None,
                                           original_weights=originals)
                    stage.apply(context, report)
                    next_hidden = context.next_inputs  # a later stage's changes invalidate earlier outputs
            if inputs is not None and index + 1 < len(adapter):
                next_hidden = next_hidden if next_hidden is not None else run_block(block, inputs)
                inputs = inputs.following(next_hidden)
        if checkpoint is not None:
            checkpoint.save(model, adapter, index, inputs, report, plans,
                            elapsed_before + time.perf_counter() - start)
    del inputs
    _train(model, full_recipe, after_blocks, calibration, device, teacher, checkpoint, report)
    return _finish(model, full_recipe, report, start - elapsed_before, device, was_training)


def _train(model: PreTrainedModel, recipe: Recipe, stages: list, calibration: torch.Tensor | None,
           device: torch.device, teacher: nn.Module | None, checkpoint: BlockCheckpoint | None,
           report: CompressionReport) -> None:
    """The `after_blocks` stages (distillation, fine-tuning), in order, on the compressed model."""
    for stage in stages:
        stage.apply(ModelContext(model, calibration, recipe.calibration.batch_size, device, teacher=teacher,
                                 checkpoint_dir=checkpoint.directory if checkpoint is not None else None), report)


def _finish(model: PreTrainedModel, recipe: Recipe, report: CompressionReport, start: float, device: torch.device,
            was_training: bool) -> CompressionReport:
    storage = resolve_float_storage(model, recipe.float_storage)
    report.float_storage = str(storage).removeprefix("torch.")
    if storage != torch.float32:
        round_float_parameters_(model, storage)
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return report


def resolve_float_storage(model: nn.Module, setting: str) -> torch.dtype:
    """The dtype the uncompressed float parameters are kept in: `setting`, or for "auto" the 16-bit
    dtype the checkpoint was saved in (`slimlm_source_dtype`, set by `slimlm.models.load_model`; the
    parameters' own dtype otherwise), else bfloat16: float32 storage doubles the file for a rounding
    whose cost the evaluation of the compressed model measures."""
    if setting != "auto":
        return getattr(torch, setting)
    sixteen_bit = (torch.bfloat16, torch.float16)
    own = next((tensor.dtype for tensor in model.parameters() if tensor.is_floating_point()), None)
    for candidate in (getattr(model, "slimlm_source_dtype", None), own):
        if candidate in sixteen_bit:
            return candidate
    return torch.bfloat16


@torch.no_grad()
def round_float_parameters_(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every wider float parameter to the values of `dtype` (keeping its own dtype)."""
    for tensor in model.parameters():
        if tensor.is_floating_point() and tensor.element_size() > torch.finfo(dtype).bits // 8:
            tensor.copy_(tensor.to(dtype).to(tensor.dtype))


