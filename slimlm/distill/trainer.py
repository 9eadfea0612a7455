"""One training loop for distillation, recovery fine-tuning and (later) quantization-aware training.

    result = train(student, objective, data, TrainingConfig(steps=200, lr=1e-4), out_dir="run/")

- **What trains** (`TrainingConfig.trainable`): `all` (every float parameter), `norms` (the normalisation
  layers' weights and biases), `lora` (a rank-r update on every block linear, merged into the weights at
  the end), a list of parameter-name patterns (`*.mlp.*`), or `none` (only the objective's own parameters:
  TED's filters). Compressed layers keep their weights in
  buffers (packed integers, sparse values), so their quantization grids and sparse layouts never change;
  a dense linear that is at least 1% exact zeros (a pruned one) keeps its zeros where they are: its
  gradient is masked and the zeros are written back after every step, so a 2:4 student stays 2:4.
- **The loop**: AdamW, linear warm-up then cosine decay to zero (or a constant rate), gradient
  accumulation, clipping of the gradient norm, bfloat16 autocast where the device computes in it natively
  (`precision: auto`: CUDA GPUs with bfloat16, CPUs with AVX-512 BF16 or AMX; float32 elsewhere), gradient
  checkpointing on request, and a progress bar with the loss and tokens per second.
- **Checkpoints** (`checkpoint_every`): the trainable parameters, the optimizer and schedule state, the
  random-number states and the loss history, written atomically to `out_dir/checkpoint.pt`. A run given
  the same student, objective, data and settings continues from it (`resume=None` continues when one is
  there, `True` requires one, `False` discards it) and ends with the weights of an uninterrupted run: batch
  s depends only on s (`slimlm.distill.data`) and every random draw comes from a saved generator.
- **The loss curve**: `out_dir/loss.json` (step, loss, learning rate, tokens, seconds) and `out_dir/loss.svg`.

The teacher, when an objective has one, is frozen and evaluated without gradients (`Objective`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimlm.core.stage import StrictModel
from slimlm.distill.data import Batch, TrainingData
from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar
from slimlm.results import atomic_write_bytes, atomic_write_text

CHECKPOINT = "checkpoint.pt"
FIXED_ZERO_SHARE = 0.01  # a dense weight with at least this share of exact zeros is a pruned one


class TrainingConfig(StrictModel):
    """The optimisation settings every distillation and fine-tuning method shares."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="sequences per forward pass")
    grad_accumulation: int = Field(1, ge=1, description="forward passes per optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (null: no clipping)")
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False
    trainable: Literal["all", "norms", "lora", "none"] | list[str] = "all"  # none: only the objective's own
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: none)")


class Objective:
    """A training loss. Subclasses set `name` and implement `loss`; a teacher is theirs to hold (frozen)."""

    name: str = "objective"

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters of the objective itself (TinyBERT-style hidden-state projections)."""
        return {}

    def fingerprint(self) -> str:
        return self.name

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (a scalar to minimise) and numbers to show beside it."""
        raise NotImplementedError


@dataclass
class TrainingResult:
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float
    trainable_parameters: int
    precision: str = "float32"  # what the forward passes computed in
    resumed_from: int = 0  # the step a resumed run continued after (0: it started fresh)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {key: value for key, value in vars(self).items() if key != "history"}


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context of a resolved precision on `device` (a no-op for float32)."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def resolve_precision(device: torch.device, precision: str) -> torch.dtype:
    """bfloat16 for `auto` where the hardware computes in it natively (a CUDA GPU with bfloat16, a CPU with
    AVX-512 BF16 or AMX; `benchmarks/distillation.py --precision-speed` measures the gain), else float32."""
    if precision != "auto":
        return getattr(torch, precision)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        from slimlm.quant.kernels import cpu_flags

        return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & set(cpu_flags()) else torch.float32
    return torch.float32


def select_trainable(model: nn.Module, config: TrainingConfig) -> dict[str, nn.Parameter]:
    """Freeze `model` except what `config.trainable` names (module docstring); returns {name: parameter}."""
    if config.trainable == "lora":
        from slimlm.finetune.lora import add_lora

        add_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=0.0)
        chosen = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    else:
        norms = {name for name, module in model.named_modules() if "norm" in type(module).__name__.lower()}
        chosen = {}
        for name, param in model.named_parameters():
            owner = name.rpartition(".")[0]
            if config.trainable == "all":
                keep = param.is_floating_point()
            elif config.trainable == "norms":
                keep = owner in norms
            else:
                keep = any(fnmatch(name, pattern) for pattern in config.trainable)
            if keep:
                chosen[name] = param
    for param in model.parameters():
        param.requires_grad_(False)
    for param in chosen.values():
        param.requires_grad_(True)
    if not chosen and config.trainable != "none":
        raise SlimlmError(f"trainable={config.trainable!r} selects no parameter of the student: use 'all', "
                          "'norms', 'lora' or patterns that match its parameter names")
    return chosen


def fixed_zero_masks(model: nn.Module, parameters: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Where a pruned block linear's dense weight is zero (module docstring): those entries stay zero while
    training. Only the block linears' own weights count (not LoRA's B, which starts at zero)."""
    from slimlm.models.adapter import ModelAdapter

    try:
        linears = {f"{name}.weight" for name in ModelAdapter(model).linear_layers()}
    except SlimlmError:  # not a decoder slimlm knows: no pruned layers to keep
        return {}
    masks = {}
    for name, param in parameters.items():
        if name in linears:
            zeros = param.detach() == 0
            if zeros.float().mean() >= FIXED_ZERO_SHARE:
                masks[name] = ~zeros
    return masks


def learning_rate_factor(step: int, config: TrainingConfig) -> float:
    """The multiplier of `config.lr` at optimizer step `step` (0-based): warm-up, then cosine or constant."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(config.steps - config.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - config.warmup_steps) / decay_steps))


def train(
    student: nn.Module,
    objective: Objective,
    data: TrainingData,
    config: TrainingConfig,
    out_dir: str | Path | None = None,
    resume: bool | None = None,
    callback: Callable[[int, dict, nn.Module], None] | None = None,
    description: str = "train",
) -> TrainingResult:
    """Train `student` in place on `objective` over `data` (module docstring); returns what happened.

    `callback(step, metrics, student)` runs after every optimizer step (1-based step)."""
    out = Path(out_dir) if out_dir is not None else None
    if config.checkpoint_every and out is None:
        raise SlimlmError("checkpoint_every needs an output folder (out_dir) to write checkpoints to")
    if resume and out is None:
        raise SlimlmError("resume needs the output folder (out_dir) of the interrupted run")
    device = next(student.parameters()).device
    precision = resolve_precision(device, config.precision)  # once: on CPUs it reads /proc/cpuinfo
    flags = {name: param.requires_grad for name, param in student.named_parameters()}  # put back at the end
    torch.manual_seed(config.seed)  # LoRA's initial A matrices
    parameters = select_trainable(student, config)
    parameters.update({f"objective.{name}": p for name, p in objective.extra_parameters().items()})
    masks = fixed_zero_masks(student, parameters)
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    run_id = _fingerprint(student, parameters, objective, data, config)
    start_step, history, elapsed = 0, [], 0.0
    state = _load_checkpoint(out, run_id, resume)
    if state is not None:
        start_step, history, elapsed = state["step"], state["history"], state["elapsed"]
        with torch.no_grad():
            for name, param in parameters.items():
                param.copy_(state["parameters"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        generator.set_state(state["generator"])
        print(f"slimlm: resuming training after step {start_step} of {config.steps} from {out / CHECKPOINT}",
              file=sys.stderr)
    if config.gradient_checkpointing:
        _enable_checkpointing(student)
    was_training = student.training
    student.train()
    started = time.perf_counter() - elapsed
    tokens = history[-1]["tokens"] if history else 0
    bar = progress_bar(range(start_step, config.steps), desc=description, total=config.steps - start_step)
    try:
        for step in bar:
            metrics = _step(student, objective, data, config, optimizer, parameters, masks, generator, step, device,
                            precision)
            schedule.step()
            tokens += metrics.pop("tokens")
            seconds = time.perf_counter() - started
            shown = {key: value for key, value in metrics.items() if key not in ("loss", "lr")}
            history.append({"step": step + 1, "loss": metrics["loss"], "lr": metrics["lr"], "tokens": tokens,
                            "seconds": round(seconds, 3), **shown})
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
            if callback is not None:
                callback(step + 1, history[-1], student)
            if out is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                _save_checkpoint(out, run_id, step + 1, parameters, optimizer, schedule, generator, history, seconds)
                write_loss_curve(out, history, description)
    finally:
        bar.close()
        student.train(was_training)
        if config.gradient_checkpointing and hasattr(student, "gradient_checkpointing_disable"):
            student.gradient_checkpointing_disable()
    if config.trainable == "lora":
        from slimlm.finetune.lora import merge_lora_

        merge_lora_(student)
    for name, param in student.named_parameters():
        param.requires_grad_(flags.get(name, False))
    if out is not None:
        write_loss_curve(out, history, description)
    count = sum(p.numel() for p in parameters.values())
    first, last = (history[0]["loss"], history[-1]["loss"]) if history else (math.nan, math.nan)
    return TrainingResult(config.steps, tokens, time.perf_counter() - started, first, last, count,
                          str(precision).removeprefix("torch."), start_step, history)


def _step(student: nn.Module, objective: Objective, data: TrainingData, config: TrainingConfig,
          optimizer: torch.optim.Optimizer, parameters: dict[str, nn.Parameter], masks: dict[str, torch.Tensor],
          generator: torch.Generator, step: int, device: torch.device, precision: torch.dtype) -> dict:
    """One optimizer step over `grad_accumulation` micro-batches; returns the mean loss and the tokens seen."""
    optimizer.zero_grad(set_to_none=True)
    total, tokens, extras = 0.0, 0, {}
    for micro in range(config.grad_accumulation):
        batch = data.batch(step * config.grad_accumulation + micro, config.batch_size).to(device)
        with autocast(device, precision):
            loss, shown = objective.loss(student, batch, generator)
        if not torch.isfinite(loss):
            raise SlimlmError(f"the training loss became {float(loss)} at step {step + 1}: lower the learning "
                              f"rate (lr={config.lr}) or use precision: float32")
        (loss / config.grad_accumulation).backward()
        total += float(loss.detach()) / config.grad_accumulation
        tokens += int(batch.attention_mask.sum())
        for key, value in shown.items():
            extras[key] = extras.get(key, 0.0) + value / config.grad_accumulation
    for name, mask in masks.items():
        if parameters[name].grad is not None:
            parameters[name].grad.mul_(mask)
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(parameters.values()), config.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].mul_(mask)
    return {"loss": total, "lr": lr, "tokens": tokens, **extras}


def _enable_checkpointing(student: nn.Module) -> None:
    if not hasattr(student, "gradient_checkpointing_enable"):
        raise SlimlmError(f"gradient_checkpointing: {type(student).__name__} is not a transformers model that "
                          "supports it; set gradient_checkpointing: false")
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(student, "config", None) is not None:
        student.config.use_cache = False


def _fingerprint(student: nn.Module, parameters: dict[str, nn.Parameter], objective: Objective,
                 data: TrainingData, config: TrainingConfig) -> str:
    """What decides the result of a run: a checkpoint of any other run is never continued."""
    from slimlm.version import __version__

    digest = hashlib.sha256()
    settings = config.model_dump(exclude={"checkpoint_every"})
    parts = [__version__, torch.__version__, str(torch.get_num_threads()), json.dumps(settings, sort_keys=True),
             objective.fingerprint(), data.fingerprint(), type(student).__name__]
    for name, param in parameters.items():
        parts.append(f"{name}:{tuple(param.shape)}:{param.dtype}:{float(param.detach().double().sum()):.17g}")
    for part in parts:
        digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def _save_checkpoint(out: Path, run_id: str, step: int, parameters: dict[str, nn.Parameter],
                     optimizer: torch.optim.Optimizer, schedule, generator: torch.Generator, history: list[dict],
                     seconds: float) -> None:
    state = {"run": run_id, "step": step, "elapsed": seconds, "history": history,
             "parameters": {name: p.detach().cpu().clone() for name, p in parameters.items()},
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "rng": torch.get_rng_state(), "generator": generator.get_state()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out / CHECKPOINT, buffer.getvalue())


def _load_checkpoint(out: Path | None, run_id: str, resume: bool | None) -> dict | None:
    path = out / CHECKPOINT if out is not None else None
    if path is None or not path.is_file():
        if resume:
            raise SlimlmError(f"resume: {path or 'no output folder'} holds no training checkpoint; run without "
                              "--resume to start from step 0")
        return None
    if resume is False:
        path.unlink()
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged file: say which and what to do
        raise SlimlmError(f"{path} is not a readable training checkpoint ({type(error).__name__}: {error}); "
                          "delete it to start over") from error
    if state.get("run") != run_id:
        if resume:
            raise SlimlmError(f"{path} is the checkpoint of another run (other student, data, objective or "
                              "settings): rerun with the same ones, or without --resume to start over")
        print(f"slimlm: {path} belongs to another run; starting from step 0", file=sys.stderr)
        return None
    return state


def write_loss_curve(out: Path, history: list[dict], title: str) -> None:
    """`loss.json` and `loss.svg` (loss against training tokens) in `out`."""
    from slimlm.report.plots import line_svg

    atomic_write_text(out / "loss.json", json.dumps(history, indent=1) + "\n")
    points = [(row["tokens"], row["loss"]) for row in history]
    atomic_write_text(out / "loss.svg", line_svg({"training loss": points}, "training tokens", "loss", title) + "\n")
