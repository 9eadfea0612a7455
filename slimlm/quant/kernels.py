"""Which low-bit CPU kernels make a float32 model decode fast on this machine, decided at run time.

Three paths exist for the float32 activations of `QuantizedLinear` layers during generation:
- "native": slimlm's own kernels (`slimlm.quant.cpu_kernels`, compiled on first use with -march=native):
  activations quantized to int8 per block of 32, integer dot products with the packed 2/3/4/8-bit codes
  (AVX2, or AVX-512 VNNI / AVX-VNNI where present), any group size that is a multiple of 32, asymmetric
  or symmetric, act-order groups through a column permutation applied to the activations;
- "bf16": PyTorch's packed kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`), vectorised for
  bfloat16 inputs only, reached by casting the activations; fast on AVX-512 BF16 / AMX CPUs, slower than
  float32 on some AVX2-only ones;
- "reference": dequantize and run the float32 GEMM (exact).
The choice is measured once per process, the first time a generation asks (`decode_kernels`): a stack
of 16 layers of 1536 x 576 (larger than the CPU caches, as a model's weights are) is run at one token
through each available path (about 0.3 s), and the fastest path is taken if it beats float32 by 20%.
`SLIMLM_KERNELS=native|bf16|reference` overrides the measurement (native falls back to the others
where the extension cannot be built). The native kernels also serve float32 `nn.Linear` layers of the
generation runner at one to eight tokens (`slimlm.infer.runner`).

Only slimlm's generation runner (`slimlm.infer`) turns these paths on, around its forward passes:
evaluation (`slimlm eval`, perplexity, zero-shot) stays on the exact reference path, so quality numbers
do not depend on which CPU computed them. The bf16 cast rounds activations to about 3 significant
digits, the native path quantizes them to int8 per 32 values (as llama.cpp's Q8 activations);
`benchmarks/deploy.py` reports the KL divergence and the perplexity each decode path gives.
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

import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError
from slimlm.quant import cpu_kernels

HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
ENV = "SLIMLM_KERNELS"
CHOICES = ("auto", "native", "bf16", "reference")
_REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                   "amx_tile", "amx_int8", "amx_bf16")
_MIN_SPEEDUP = 1.2  # a low-bit path must beat float32 by this much to be chosen
PATHS = ("native", "bf16", "reference")

# Set by the generation runner around its forward passes: the path float32 inputs of quantized layers take.
_decoding: ContextVar[str] = ContextVar("slimlm_decode_kernels", default="reference")


@dataclass(frozen=True)
class KernelChoice:
    """How float32 inputs of quantized layers are computed during generation, and why."""

    path: str  # "native", "bf16" or "reference"
    reason: str
    cpu_flags: tuple[str, ...] = ()
    torch_capability: str = ""
    measured_ms: dict[str, float] = field(default_factory=dict)  # per 1536 x 576 layer, one token
    native_isa: str = ""  # what the native kernels were compiled for, "" where they are unavailable

    @property
    def fp32_via_bf16(self) -> bool:
        return self.path == "bf16"

    @property
    def native(self) -> bool:
        return self.path == "native"

    @property
    def label(self) -> str:
        if self.path == "native":
            return f"slimlm native kernels, int8 activations ({self.native_isa})"
        if self.path == "bf16":
            return "int4/int8 packed kernels, bf16 activations"
        return "reference (dequantize, fp32)"

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label, "fp32_via_bf16": self.fp32_via_bf16}


def cpu_flags() -> tuple[str, ...]:
    """The vector-extension flags of this CPU that matter for the kernels (Linux /proc/cpuinfo; else empty)."""
    present = set(cpu_kernels.cpu_flags_line().partition(":")[2].split())
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
    native_isa = cpu_kernels.isa() if mode in ("auto", "native") else ""
    available = [path for path, ok in (("native", bool(native_isa)), ("bf16", HAS_INT4_KERNEL)) if ok]
    if mode != "auto":
        if mode in available or mode == "reference":
            return KernelChoice(mode, f"{ENV}={mode}", flags, capability, native_isa=native_isa)
        fallback = "bf16" if mode == "native" and HAS_INT4_KERNEL else "reference"
        why = cpu_kernels.load_error() if mode == "native" else "this PyTorch has no int4 packed CPU kernel"
        return KernelChoice(fallback, f"{ENV}={mode} unavailable ({why}): {fallback}", flags, capability,
                            native_isa=native_isa)
    if not available:
        return KernelChoice("reference", "no low-bit kernel: the native kernels did not build "
                            f"({cpu_kernels.load_error()}) and this PyTorch has no int4 packed CPU kernel",
                            flags, capability)
    measured = _measure(available)
    best = min(available, key=lambda path: measured[_TIMED[path]])
    wins = measured["fp32_gemv"] >= _MIN_SPEEDUP * measured[_TIMED[best]]
    path = best if wins else "reference"
    timings = ", ".join(f"{name} {value:.3f} ms" for name, value in measured.items())
    reason = (f"measured per 1536x576 layer at one token: {timings} ({path} chosen; a low-bit path needs "
              f"{_MIN_SPEEDUP}x float32)")
    return KernelChoice(path, reason, flags, capability, measured, native_isa)


_TIMED = {"native": "int4_native", "bf16": "int4_bf16"}


def _measure(paths: list[str], rows: int = 1536, columns: int = 576, group_size: int = 64, layers: int = 16,
             repeats: int = 7) -> dict[str, float]:
    """Median milliseconds per layer of one token through `layers` float32 linears (more bytes than the CPU
    caches hold, as a model's weights) and through the same number of 4-bit layers on each path."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, columns, generator=generator) for _ in range(layers)]
    x = torch.randn(1, columns, generator=generator)
    codes = torch.randint(0, 16, (rows, columns), generator=generator, dtype=torch.int32)
    scale = torch.rand(rows, columns // group_size, generator=generator) / 16
    candidates = {"fp32_gemv": [lambda w=w: F.linear(x, w) for w in weights]}
    if "native" in paths:
        column_group = torch.arange(columns) // group_size
        operands = [cpu_kernels.lowbit_operands(codes.roll(i, 0), scale, torch.full_like(scale, 8.0), 4, column_group)
                    for i in range(layers)]
        candidates["int4_native"] = [lambda o=o: cpu_kernels.lowbit_matmul(x, o) for o in operands]
    if "bf16" in paths:
        packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.roll(i, 0), 1) for i in range(layers)]
        scales_and_zeros = torch.ones(columns // group_size, rows, 2, dtype=torch.bfloat16)
        x16 = x.to(torch.bfloat16)
        candidates["int4_bf16"] = [lambda p=p: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x16, p, group_size, scales_and_zeros).float() for p in packed]
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for _ in range(repeats):  # alternate, so that a burst of other work hits all alike
            for name, runs in candidates.items():
                start = time.perf_counter()
                for run in runs:
                    run()
                timings[name].append((time.perf_counter() - start) * 1e3 / layers)
    return {name: statistics.median(values[1:]) for name, values in timings.items()}  # warm-up dropped


@contextmanager
def decode_kernels(enabled: bool = True) -> Iterator[None]:
    """Inside: float32 inputs of quantized layers take the decode path chosen for this CPU (see
    `kernel_choice`). Used by the generation runner; evaluation stays exact."""
    token = _decoding.set(kernel_choice().path if enabled else "reference")
    try:
        yield
    finally:
        _decoding.reset(token)


def fp32_decode_path() -> str:
    """The path float32 inputs of quantized layers take now: "native", "bf16" or "reference"."""
    return _decoding.get()


def last_decode_paths(model: torch.nn.Module) -> str | None:
    """The paths the quantized layers took in the last forward (e.g. `int4`, `native4+native8`), joined; None for
    a model without quantized layers."""
    from slimlm.core.registry import layer_kind

    paths = sorted({m.last_path for m in model.modules() if layer_kind(m) == "quantized"})
    return "+".join(paths) if paths else None
