"""Which low-bit CPU kernels make a float32 model decode fast on this machine, decided at run time.

`QuantizedLinear` has PyTorch's packed kernels for 4-bit grouped (`_weight_int4pack_mm_for_cpu`) and
8-bit per-channel (`_weight_int8pack_mm`) weights. They are vectorised for bfloat16 inputs only, so a
float32 model reaches them by casting its activations to bfloat16 around the kernel. Whether that pays
depends on the CPU: on AVX-512 (BF16 / AMX) machines a 576 x 1536 layer at one token runs several times
faster than the float32 GEMV, on AVX2-only machines the same kernel can be slower than float32. So the
choice is measured, once per process: the first time a generation asks (`decode_kernels`), one such
layer is timed both ways (about 0.1 s), and the bfloat16 kernels are used for float32 decoding only if
they win by 20% or more. `SLIMLM_KERNELS=bf16|reference` overrides the measurement.

Only slimlm's generation runner (`slimlm.infer`) turns the cast on, around its forward passes:
evaluation (`slimlm eval`, perplexity, zero-shot) stays on the exact reference path, so quality numbers
do not depend on which CPU computed them. The cast costs bfloat16 rounding of the activations (about 3
significant digits); `benchmarks/deploy.py` reports the KL divergence it causes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError

HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
ENV = "SLIMLM_KERNELS"
CHOICES = ("auto", "bf16", "reference")
_REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                   "amx_tile", "amx_int8", "amx_bf16")
_MIN_SPEEDUP = 1.2  # the bfloat16 kernels must beat float32 by this much to be chosen

# Set by the generation runner around its forward passes: float32 inputs may take the bfloat16 kernels.
_decoding: ContextVar[bool] = ContextVar("slimlm_decode_kernels", default=False)


@dataclass(frozen=True)
class KernelChoice:
    """How float32 inputs of quantized layers are computed during generation, and why."""

    fp32_via_bf16: bool
    reason: str
    cpu_flags: tuple[str, ...] = ()
    torch_capability: str = ""
    measured_ms: dict[str, float] = field(default_factory=dict)  # one 1536 x 576 layer, one token

    @property
    def label(self) -> str:
        return "int4/int8 packed kernels, bf16 activations" if self.fp32_via_bf16 else "reference (dequantize, fp32)"

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def cpu_flags() -> tuple[str, ...]:
    """The vector-extension flags of this CPU that matter for the kernels (Linux /proc/cpuinfo; else empty)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    present = set(line.partition(":")[2].split())
    return tuple(flag for flag in _REPORTED_FLAGS if flag in present)


def torch_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


@lru_cache(maxsize=1)
def kernel_choice() -> KernelChoice:
    """This process's decision (measured on first call, then cached)."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in CHOICES:
        raise SlimlmError(f"{ENV}={mode!r} is not one of {', '.join(CHOICES)}")
    flags, capability = cpu_flags(), torch_capability()
    if not HAS_INT4_KERNEL:
        return KernelChoice(False, "this PyTorch has no int4 packed CPU kernel", flags, capability)
    if mode != "auto":
        return KernelChoice(mode == "bf16", f"{ENV}={mode}", flags, capability)
    measured = _measure()
    wins = measured["fp32_gemv"] >= _MIN_SPEEDUP * measured["int4_bf16"]
    reason = (f"measured: int4 kernel with bf16 activations {measured['int4_bf16']:.3f} ms, float32 GEMV "
              f"{measured['fp32_gemv']:.3f} ms per 1536x576 layer at one token "
              f"({'chosen' if wins else 'not chosen'}: needs {_MIN_SPEEDUP}x)")
    return KernelChoice(wins, reason, flags, capability, measured)


def _measure(rows: int = 1536, columns: int = 576, group_size: int = 64, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds of one token through a float32 linear and through the int4 kernel (bf16)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, columns, generator=generator)
    x = torch.randn(1, columns, generator=generator)
    codes = torch.randint(0, 16, (rows, columns), generator=generator, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.ones(columns // group_size, rows, 2, dtype=torch.bfloat16)
    candidates = {
        "fp32_gemv": lambda: F.linear(x, weight),
        "int4_bf16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed, group_size, scales_and_zeros).float(),
    }
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for _ in range(repeats):  # alternate, so that a burst of other work hits both alike
            for name, run in candidates.items():
                start = time.perf_counter()
                run()
                timings[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values[repeats // 5:]) for name, values in timings.items()}  # warm-up dropped


@contextmanager
def decode_kernels(enabled: bool = True) -> Iterator[None]:
    """Inside: float32 inputs of quantized layers take the packed bfloat16 kernels where this CPU runs them
    faster (see `kernel_choice`). Used by the generation runner; evaluation stays exact."""
    token = _decoding.set(enabled and kernel_choice().fp32_via_bf16)
    try:
        yield
    finally:
        _decoding.reset(token)


def fp32_decode_active() -> bool:
    return _decoding.get()
