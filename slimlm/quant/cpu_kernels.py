"""slimlm's own CPU decode kernels (`csrc/cpu_kernels.cpp`), compiled on first use for the CPU that runs them.

PyTorch's packed low-bit kernels are fast only with bfloat16 activations on AVX-512 BF16 / AMX CPUs; on
AVX2-only machines they can be slower than float32. These kernels do what llama.cpp and ONNX Runtime do
on any x86 CPU with AVX2: the few activation rows of a decode step are quantized to int8 per block of 32
(`quantize_activations`), and the packed 4-bit (also 2-/3-bit, held in nibbles) or 8-bit weight codes are
multiplied with them by integer dot products (AVX2 `maddubs`, or `dpbusd` where AVX-512 VNNI / AVX-VNNI
exist), scaled once per 32 columns; the zero point enters through the per-group sums of the activations.
A third kernel, `f32_few_rows`, computes float32 x @ W.T for one to eight rows reading W once, which is
what speculative verification (a few tokens at a time) needs from a float32 target; a fourth,
`s8_few_rows`, the exact int8 x int8 -> int32 product of a few rows (W8A8 decode: the same integers as
`torch._int_mm`, which is slower than float32 at one row), and `w8a8_matmul` the whole W8A8 product of a
few rows (activation quantization, integer products, rescale) in one call, bit for bit what `Int8Linear`
computes with some twenty PyTorch operations.

The extension is built with torch's C++ extension loader and `-march=native` into
`$SLIMLM_CACHE/kernels/<hash of source, torch version, compiler flags and CPU flags>` (tens of seconds,
once per machine). Without a C++ compiler, or if the build fails, `load()` returns None with the reason
in `load_error()`, and slimlm keeps its other paths. `reference_lowbit_matmul` is the same arithmetic in
PyTorch, which the tests hold the compiled kernels to.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch

from slimlm.quant.grid import column_groups

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
BLOCK = 32  # activation quantization block and the granularity of weight groups
MAX_ROWS = 8  # the low-bit kernels process this many activation rows per weight load
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"]
STALE_LOCK_S = 600  # a build takes well under a minute; a lock this old belongs to a killed one
_load_error: list[str] = []


def cpu_flags_line() -> str:
    """This CPU's feature-flags line of /proc/cpuinfo (Linux; else "")."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def build_directory(cflags: list[str] = CFLAGS) -> Path:
    """Where this machine's build lives: a new CPU, torch, source or flag set gets a new build."""
    key = "\n".join([SOURCE.read_text(encoding="utf-8"), torch.__version__, sys.version, " ".join(cflags),
                     platform.machine(), cpu_flags_line() or platform.processor()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))
    return root / "kernels" / f"cpu_kernels_{digest}"


@lru_cache(maxsize=1)
def load():
    """The compiled extension, or None (no compiler, a failed build, not x86/Linux-like); see `load_error`."""
    if os.environ.get("SLIMLM_NATIVE_KERNELS", "1").strip() == "0":
        _load_error.append("SLIMLM_NATIVE_KERNELS=0")
        return None
    try:
        return build(CFLAGS)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the other paths
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        _load_error.append(message)
        log.warning("slimlm's CPU kernels are unavailable (%s); decoding uses the other paths", message)
        return None


def build(cflags: list[str]):
    """Compile (or reuse) the extension with these compiler flags; raises if the build fails. `load()` uses
    -march=native; the tests also build an AVX2-only variant (-march=haswell) to check that path here."""
    from torch.utils import cpp_extension

    # torch runs `ninja` from PATH: also find the one pip installed beside this interpreter (`.[dev]`)
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), scripts])
    directory = build_directory(cflags)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"  # torch's build lock: a build killed midway leaves it, and every later load waits
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing a stale build lock %s (a build was interrupted)", lock)
        lock.unlink(missing_ok=True)
    if not any(directory.glob("*.so")):  # a first build takes tens of seconds: say why the pause
        print(f"slimlm: compiling its CPU kernels for this machine into {directory} (once, about 30 s)",
              file=sys.stderr, flush=True)
    # The loader takes a file lock in the build directory, so concurrent processes build it once.
    return cpp_extension.load(name=f"slimlm_{directory.name}", sources=[str(SOURCE)], extra_cflags=cflags,
                              build_directory=str(directory), verbose=False)


def load_error() -> str:
    return _load_error[-1] if _load_error else ""


def isa() -> str:
    """The instruction set the compiled kernels use ("avx512-vnni", "avx-vnni", "avx2", "scalar"), or ""."""
    module = load()
    return module.isa() if module is not None else ""


@dataclass(frozen=True)
class LowbitOperands:
    """A quantized weight in the kernels' layout: w[n, k] = scale[n, g] * (code - zero[n, g]), g = group of k.

    weight: 4-bit kernel: uint8 [N, K/32, 16] (byte j of a block: code j low, code j + 16 high nibble);
    8-bit kernel: int8 [N, K] holding code - 128. scaled_zero: scale * zero in that code domain.
    block_group: int32 [K/32], the group of each 32-column block. permutation: the column order the
    kernel's groups need (act-order layers), applied to the activations; None when the order is natural."""

    bits: int
    weight: torch.Tensor
    scale: torch.Tensor
    scaled_zero: torch.Tensor
    block_group: torch.Tensor
    permutation: torch.Tensor | None

    @property
    def path(self) -> str:
        return f"native{self.bits}"


@dataclass(frozen=True)
class Int8Operands:
    """A W8A8 layer (`slimlm.quant.w8a8.Int8Linear`) in the kernels' layout: int8 weight [N, K], float32
    weight_scale [N]; the activations quantized to symmetric `bits`-bit integers per row (static_scale None)
    or with one calibrated scale."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bits: int
    static_scale: float | None
    path: ClassVar[str] = "int8-native"


NativeOperands = LowbitOperands | Int8Operands


def lowbit_operands(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    column_group: torch.Tensor) -> LowbitOperands | None:
    """Build the kernel layout from (out, in) integer codes, [out, groups] scale and zero (zero in code units)
    and the group of each input column; None where the kernels cannot express the grid (a group whose
    columns are not a multiple of 32, more than 8 bits)."""
    out_features, in_features = codes.shape
    if bits > 8 or in_features % BLOCK:
        return None
    column_group = column_group.long()
    permutation = None
    if bool((column_group[1:] < column_group[:-1]).any()):
        permutation = torch.argsort(column_group, stable=True)
        codes, column_group = codes[:, permutation], column_group[permutation]
    block_group = column_group.view(-1, BLOCK)
    if not bool((block_group == block_group[:, :1]).all()):
        return None  # a group boundary inside a 32-column block
    block_group = block_group[:, 0].to(torch.int32).contiguous()
    scale, zero = scale.float(), zero.float()
    if bits <= 4:
        blocks = codes.to(torch.uint8).view(out_features, -1, 2, BLOCK // 2)
        weight = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).contiguous()
        scaled_zero = scale * zero
    else:
        weight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        scaled_zero = scale * (zero - 128.0)
    return LowbitOperands(4 if bits <= 4 else 8, weight, scale.contiguous(), scaled_zero.contiguous(), block_group,
                          None if permutation is None else permutation.contiguous())


def quantized_operands(quantized) -> LowbitOperands | None:
    """The kernel layout of a `slimlm.quant.grid.QuantizedWeight` (None for non-integer grids and grids the
    kernels cannot express)."""
    if quantized.fmt != "int" or quantized.codebook is not None:
        return None
    column_group = column_groups(quantized.in_features, quantized.group_size, quantized.g_idx)
    return lowbit_operands(quantized.codes, quantized.scale, quantized.zero, quantized.bits, column_group)


def lowbit_matmul(x: torch.Tensor, operands: LowbitOperands, module=None) -> torch.Tensor:
    """x [..., K] float32 times the weight's transpose through the compiled kernel (`module`: another build
    than `load()`'s): [..., N]."""
    return lowbit_matmul_many(x, (operands,), module)


def lowbit_matmul_many(x: torch.Tensor, parts: Sequence[LowbitOperands], module=None) -> torch.Tensor:
    """x times several weights on the same columns (`fusable`), the activations quantized once: [..., sum N]."""
    first = parts[0]
    x = x.float() if x.dtype != torch.float32 else x
    if first.permutation is not None:
        x = x.index_select(-1, first.permutation)
    run = (module or load()).q4_matmul if first.bits == 4 else (module or load()).q8_matmul
    return run(x.contiguous(), [p.weight for p in parts], [p.scale for p in parts], [p.scaled_zero for p in parts],
               first.block_group)


def native_matmul_many(x: torch.Tensor, parts: Sequence[NativeOperands], module=None) -> torch.Tensor:
    """x [..., K] times one or more layers' weights (`fusable`) through the compiled kernels: [..., sum N]."""
    first = parts[0]
    if isinstance(first, LowbitOperands):
        return lowbit_matmul_many(x, parts, module)
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = (module or load()).w8a8_matmul(rows, [p.weight for p in parts], [p.weight_scale for p in parts], first.bits,
                                       first.static_scale or 0.0)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def fusable(parts: Sequence[NativeOperands | None]) -> bool:
    """Whether these layers can run as one kernel call: same kind and bits, and same column groups and
    permutation (low-bit weights) or same activation grid (W8A8)."""
    if any(p is None for p in parts) or any(type(p) is not type(parts[0]) for p in parts):
        return False
    first = parts[0]
    if isinstance(first, Int8Operands):
        return all(p.bits == first.bits and p.static_scale == first.static_scale for p in parts[1:])
    return all(p.bits == first.bits and p.scale.shape[1] == first.scale.shape[1]
               and (p.block_group is first.block_group or torch.equal(p.block_group, first.block_group))
               and ((p.permutation is None and first.permutation is None)
                    or (p.permutation is not None and first.permutation is not None
                        and torch.equal(p.permutation, first.permutation)))
               for p in parts[1:])


def quantize_activations(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization in PyTorch: int8 values (as float) and the per-block scale d."""
    blocks = rows.float().reshape(rows.shape[0], -1, BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(blocks * inverse), d


def reference_lowbit_matmul(x: torch.Tensor, operands: LowbitOperands) -> torch.Tensor:
    """What the compiled kernel computes, in float64 PyTorch (the tests' reference; slow)."""
    rows = x.reshape(-1, x.shape[-1]).double()
    if operands.permutation is not None:
        rows = rows[:, operands.permutation]
    q, d = quantize_activations(rows)
    x_hat = (q.double() * d.double()).reshape(rows.shape)  # dequantized activations
    out_features = operands.scale.shape[0]
    if operands.bits == 4:
        low, high = operands.weight & 0x0F, operands.weight >> 4
        codes = torch.cat([low, high], dim=-1).reshape(out_features, -1).double()
    else:
        codes = operands.weight.double()
    group = operands.block_group.long().repeat_interleave(BLOCK)
    weight = operands.scale.double()[:, group] * codes - operands.scaled_zero.double()[:, group]
    return (x_hat @ weight.t()).float().reshape(*x.shape[:-1], out_features)


def s8_few_rows(x: torch.Tensor, weight: torch.Tensor, module=None) -> torch.Tensor:
    """Exact int8 x [M, K] @ int8 weight [N, K].T as int32 [M, N] (what torch._int_mm computes), for a few rows."""
    return (module or load()).s8_few_rows(x.contiguous(), weight)


def f32_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, module=None) -> torch.Tensor:
    """F.linear(x, weight, bias) for float32 x of at most a few rows, through the compiled kernel."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = (module or load()).f32_few_rows(rows, weight)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])
