"""Calibration spread over processes with torch.distributed (`torchrun --nproc-per-node N -m slimlm compress ...`).

Each process holds the whole model and runs the block pass on its share of the calibration segments (a
contiguous slice of them, in order). What the methods gather from those segments is summed over the
processes before it is used: the input Hessians (`slimlm.core.hessian`: GPTQ, SparseGPT) as the
token-weighted mean of every process's running average, and the per-channel sums of
`slimlm.core.statistics` (Wanda). Every process then solves the same problem and holds the same compressed
model; the first process saves it. gloo on CPU, NCCL on GPU.

The sum is taken in another order than one process takes it (per-process running averages, then their
weighted mean), so the Hessians agree with the single-process ones to float32 rounding, not bitwise, and a
rounding decision of GPTQ may fall the other way where a weight sits on the boundary between two grid points
(measured in benchmarks/results/reliability.md).

Methods whose statistics are not sums over tokens (AWQ's and SmoothQuant's searches, OmniQuant's training,
the whole-model stages that score the model on calibration text) are refused under several processes
(`check_recipe`), as is a resumable checkpoint (each process would need its own share of the block inputs).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from slimlm.errors import SlimlmError

# Stages whose calibration statistics are sums over tokens reduced here, or that use none.
SUPPORTED = ("gptq", "sparsegpt", "wanda", "magnitude", "rtn", "quantize_head")


def requested() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def start(device: str | None) -> None:
    """Join the process group the launcher's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if not torch.distributed.is_available():
        raise SlimlmError("this PyTorch build has no torch.distributed: run slimlm compress in one process")
    if torch.distributed.is_initialized():
        return
    cuda = device is not None and device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Long timeout: the first process evaluates the model (--eval) while the others wait at the first reduction.
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=4))


def stop() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_recipe(methods: list[str], samples: int) -> None:
    """Refuse, before any work, what several processes cannot run the same as one."""
    unsupported = [m for m in methods if m not in SUPPORTED]
    if unsupported:
        raise SlimlmError(f"{', '.join(unsupported)} cannot calibrate across processes (distributed calibration "
                          f"supports {', '.join(SUPPORTED)}): run it in one process, without torchrun")
    if samples < world_size():
        raise SlimlmError(f"{samples} calibration segments cannot be shared by {world_size()} processes: use at "
                          f"least {world_size()} (--calib-samples) or fewer processes")


def shard(calibration: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of the calibration segments (the first processes take one more)."""
    count, size, index = len(calibration), world_size(), rank()
    start = index * (count // size) + min(index, count % size)
    return calibration[start : start + count // size + (1 if index < count % size else 0)]


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


def weighted_mean_(average: torch.Tensor, count: int) -> int:
    """Replace this process's `average` of `count` samples by the mean over every process's samples, in place;
    returns the total count."""
    total = torch.tensor([float(count)], dtype=torch.float64, device=average.device)
    weighted = average.double() * count
    all_reduce_sum_(weighted, total)
    if total.item() > 0:
        average.copy_(weighted / total.item())
    return int(total.item())


def total(count: int) -> int:
    """`count` summed over the processes."""
    if not active():
        return count
    value = torch.tensor([count], dtype=torch.int64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
    return int(value.item())
