"""`QuantizedLinear`: a linear layer that stores its weight as packed codes of `slimlm.quant.grid`.

Buffers (the state dict holds only these tensors): `packed` (uint8 codes packed along the input
dimension, `slimlm.core.packing`), `scale` (out, n_groups) float16 by default (float32 where
float16 would lose precision), `zero` (out, n_groups) uint8 (asymmetric integer grids only;
symmetric grids use 2^(bits-1)), `g_idx` (in,) int32 (act-order only), `codebook` (out, n_groups,
2^bits) (codebooks only, which have no scale) and `bias`. `meta()` describes the shapes, so
`QuantizedLinear.empty(meta)` can take the state dict back.

forward(x) has two paths giving the same function:
- reference (always available, exact): dequantize to float32 on every call, then F.linear in x's
  dtype;
- fast (`use_fast_path`, default on), chosen automatically where a PyTorch CPU kernel applies:
  * 4-bit integer, group size 32/64/128/256 dividing in_features, out_features a multiple of 16, no
    act-order reordering: `aten._weight_int4pack_mm_for_cpu` (the "tinygemm" kernel of
    aten/src/ATen/native/cpu/int4mm_kernel.cpp). It dequantizes code q as (q - 8) * s + z with
    scales_and_zeros of shape (n_groups, out, 2) holding [s, z] in x's dtype, so our
    scale * (q - zero) needs s = scale and z = scale * (8 - zero).
  * 8-bit symmetric integer, per channel (or per tensor): `aten._weight_int8pack_mm(x, w_int8,
    scales)`, which computes x @ (w_int8 * scales).T; w_int8 = q - 128.
  The kernels' weight layouts are built lazily on first use and cached outside the state dict
  (the int4 layout depends on the CPU's vector width); while cached they hold as many bytes as
  `packed` again, which buffer-based size metrics do not see (`clear_kernel_cache()` frees them).
  They run in x's dtype, and only bfloat16 has vectorised kernels on x86 in PyTorch 2.13
  (float32/float16 fall back to scalar loops that are slower than the reference path), so the
  fast path serves bfloat16 inputs, and float32 inputs cast to bfloat16 (about 3 significant
  digits) inside slimlm's generation runner on CPUs where that measured faster than float32
  (`slimlm.quant.kernels`: AVX-512 BF16 / AMX machines, not AVX2-only ones). Evaluation stays on
  the exact path. `fast_path_casts_fp32_to_bf16 = True / False` forces the cast on or off.
  Both kernels are matrix-vector kernels whose cost grows linearly with the number of tokens,
  while the reference path pays one dequantization and then a fast GEMM; on a 1536 x 576 layer
  (one AVX-512/AMX core) they cross near 80 tokens, so inputs of more than
  `fast_path_max_tokens` (64) tokens take the reference path: decode uses the kernels, long
  prefills do not.
- native (float32 inputs inside slimlm's generation runner where `slimlm.quant.kernels` chose it):
  slimlm's compiled kernels (`slimlm.quant.cpu_kernels`): the activations quantized to int8 per
  block of 32, integer dot products with the codes (2/3/4-bit in nibbles, 5-8-bit as int8), any
  group size that is a multiple of 32 (a shorter last group included), act-order groups through a
  permutation of the activations folded in at layout time; float32 scales and zero points. Layers
  it cannot express (codebooks, group boundaries inside a 32-column block) take the paths above.

Deviation: the fast path computes with bfloat16 scales and zero offsets (the kernels' contract),
so it matches the reference path to bfloat16 precision, not bitwise.

Simulated weight-and-activation quantization (W4A8, W6A6, W4A4, FP8 W8A8): `quantize_inputs`
attaches an `ActivationQuantizer` (`input_quantizer`, integer or floating-point grid, per token or
per tensor), optionally an input shift (`input_shift`, (in,) float32: OmniQuant's LET shift delta,
whose compensation delta W^T the bias already holds) and an input divisor (`input_scale`, (in,)
float32: a per-channel factor already multiplied into the weight's columns, e.g. LLM-FP4's
pre-shifted exponent bias 2^rho_j). Forward is then

    y = F.linear(fake_quantize((x - input_shift) / input_scale), dequantized W) + bias

always on the reference path: the values are exactly those of integer (or FP8) arithmetic on the
codes, but the multiply runs in float32 (there is no int4 x int4 or FP8 GEMM on this CPU; the
real int8 GEMM for 8-bit weights and activations is `slimlm.quant.w8a8.Int8Linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.core.packing import pack, packed_bytes, unpack
from slimlm.core.registry import register_layer
from slimlm.errors import SlimlmError
from slimlm.quant import cpu_kernels
from slimlm.quant.activation import ActivationQuantizer
from slimlm.quant.grid import QuantizedWeight, check_format, dequantize_codes, group_bounds
from slimlm.quant.kernels import HAS_INT4_KERNEL, HAS_INT8_KERNEL, fp32_decode_path

META_VERSION = 1
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
_FAST_PATH_DTYPES = (torch.bfloat16,)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise SlimlmError(
            f"unsupported tensor dtype '{name}' in quantized-layer metadata; use one of {', '.join(_DTYPES)}"
        )
    return _DTYPES[name]


@register_layer("quantized")
class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W held as packed codes; see the module docstring for paths and buffers."""

    is_compressed_linear = True  # the architecture adapter treats it as the linear it replaces

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        fmt: str = "int",
    ) -> None:
        super().__init__()
        check_format(bits, fmt)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.fmt = bits, group_size, symmetric, fmt
        self.n_groups = len(group_bounds(in_features, group_size))
        self.use_fast_path = True
        self.fast_path_casts_fp32_to_bf16: bool | None = None  # None: as the generation runner decides
        self.fast_path_max_tokens = 64
        self.last_path = "none"  # the latest forward's path: "int4", "int8", "native4", "native8" or "reference"
        self._kernel_cache: dict[tuple, object] = {}  # kernel layouts; never in the state dict
        self.register_buffer("packed", None)
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.register_buffer("g_idx", None)
        self.register_buffer("codebook", None)
        self.register_buffer("bias", None)
        self.input_quantizer: ActivationQuantizer | None = None  # simulated W+A quantization; see the docstring
        self.register_buffer("input_shift", None)
        self.register_buffer("input_scale", None)

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: Tensor | None = None, scale_dtype: torch.dtype | None = None
    ) -> QuantizedLinear:
        """Pack a QuantizedWeight; scales (or codebook entries) are stored in scale_dtype.

        None picks float16 where it holds them at full float16 precision, float32 otherwise (e.g. the
        tiny scales absmax / 57344 of fp8_e5m2, which would be float16 subnormals).
        """
        layer = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, qw.symmetric, qw.fmt)
        if qw.scale.shape != (qw.out_features, layer.n_groups):
            raise SlimlmError(
                f"scale has shape {tuple(qw.scale.shape)}, expected {(qw.out_features, layer.n_groups)} "
                f"for group_size={qw.group_size}"
            )
        layer.packed = pack(qw.codes, qw.bits)
        if qw.fmt == "codebook":
            layer.codebook = qw.codebook.to(_storage_dtype(qw.codebook, scale_dtype, "codebook entries"))
        else:
            layer.scale = qw.scale.to(_storage_dtype(qw.scale, scale_dtype, "scales"))
        if layer._stores_zero():
            layer.zero = qw.zero.round().clamp(0, 2**qw.bits - 1).to(torch.uint8)
        if qw.g_idx is not None:
            layer.g_idx = qw.g_idx.to(torch.int32)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def replacing(cls, module: nn.Module, qw: QuantizedWeight) -> QuantizedLinear:
        """The quantized stand-in for a float linear: its bias kept, its dtype for the float buffers."""
        bias = module.bias.detach() if module.bias is not None else None
        return cls.from_quantized(qw, bias).to(module.weight.dtype)

    def quantize_inputs(self, activations, input_shift: Tensor | None = None,
                        input_scale: Tensor | None = None) -> QuantizedLinear:
        """Quantize this layer's inputs too (simulated W+A; see the module docstring). `activations` is an
        `ActivationQuantizer` or settings with bits, granularity, symmetric (and fmt); a per_tensor grid
        still has to observe calibration inputs (of (x - input_shift) / input_scale). Returns self."""
        if not isinstance(activations, ActivationQuantizer):
            activations = ActivationQuantizer(activations.bits, activations.granularity, activations.symmetric,
                                              getattr(activations, "fmt", "int"))
        device = self.packed.device if self.packed is not None else None
        self.input_quantizer = activations.to(device)
        if input_shift is not None:
            if input_shift.shape != (self.in_features,):
                raise SlimlmError(f"input_shift has shape {tuple(input_shift.shape)}, expected ({self.in_features},)")
            self.input_shift = input_shift.detach().float().to(device).clone()
        if input_scale is not None:
            if input_scale.shape != (self.in_features,) or not bool((input_scale > 0).all()):
                raise SlimlmError(f"input_scale must hold {self.in_features} positive values "
                                  f"(got shape {tuple(input_scale.shape)})")
            self.input_scale = input_scale.detach().float().to(device).clone()
        return self

    def quantized_input(self, x: Tensor) -> Tensor:
        """What the weight multiplies: x itself, or fake_quantize((x - input_shift) / input_scale) in float32."""
        if self.input_shift is not None:
            x = x - self.input_shift
        if self.input_scale is not None:
            x = x / self.input_scale
        return x if self.input_quantizer is None else self.input_quantizer.fake_quantize(x)

    @classmethod
    def from_meta(cls, meta: dict, dtype: torch.dtype) -> QuantizedLinear:
        """The empty layer a checkpoint's metadata describes, in the model's dtype; an activation grid's range
        and input shift stay float32, as they were saved."""
        layer = cls.empty(meta).to(dtype)
        if layer.input_quantizer is not None:
            layer.input_quantizer.float()
        for name in ("input_shift", "input_scale"):
            if getattr(layer, name, None) is not None:
                setattr(layer, name, getattr(layer, name).float())
        return layer

    @classmethod
    def empty(cls, meta: dict) -> QuantizedLinear:
        """A layer with zero-filled buffers of the shapes `meta` describes, ready for load_state_dict."""
        version = meta.get("version")
        if version != META_VERSION:
            raise SlimlmError(
                f"quantized-layer metadata version {version!r} is not supported (expected {META_VERSION}); "
                "re-save the model with this version of slimlm"
            )
        try:
            shape = (meta["in_features"], meta["out_features"])
            layer = cls(*shape, meta["bits"], meta["group_size"], meta["symmetric"], meta["fmt"])
            out_features, in_features, bits = layer.out_features, layer.in_features, layer.bits
            scale_dtype = _parse_dtype(meta["scale_dtype"])
            layer.packed = torch.zeros(out_features, packed_bytes(in_features, bits), dtype=torch.uint8)
            if layer.fmt == "codebook":
                layer.codebook = torch.zeros(out_features, layer.n_groups, 2**bits, dtype=scale_dtype)
            else:
                layer.scale = torch.zeros(out_features, layer.n_groups, dtype=scale_dtype)
            if layer._stores_zero():
                layer.zero = torch.zeros(out_features, layer.n_groups, dtype=torch.uint8)
            if meta["act_order"]:
                layer.g_idx = torch.zeros(in_features, dtype=torch.int32)
            if meta["bias_dtype"] is not None:
                layer.bias = torch.zeros(out_features, dtype=_parse_dtype(meta["bias_dtype"]))
            if meta.get("activations") is not None:
                layer.input_quantizer = ActivationQuantizer.from_meta(meta["activations"])
            if meta.get("input_shift"):
                layer.input_shift = torch.zeros(in_features)
            if meta.get("input_scale"):
                layer.input_scale = torch.ones(in_features)
        except KeyError as missing:
            raise SlimlmError(
                f"quantized-layer metadata lacks {missing}; re-save the model with QuantizedLinear.meta()"
            ) from None
        return layer

    def meta(self) -> dict:
        """JSON-serialisable description from which `empty` rebuilds the buffers' shapes and dtypes."""
        stored_scale = self.codebook if self.fmt == "codebook" else self.scale
        return {
            "version": META_VERSION,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "fmt": self.fmt,
            "act_order": self.g_idx is not None,
            "scale_dtype": _dtype_name(stored_scale.dtype),
            "bias_dtype": None if self.bias is None else _dtype_name(self.bias.dtype),
            "activations": None if self.input_quantizer is None else self.input_quantizer.meta(),
            "input_shift": self.input_shift is not None,
            "input_scale": self.input_scale is not None,
        }

    def _stores_zero(self) -> bool:
        return self.fmt == "int" and not self.symmetric

    # ------------------------------------------------------------------------------------------
    # Weight access and size
    # ------------------------------------------------------------------------------------------

    def codes(self) -> Tensor:
        """(out, in) uint8 codes."""
        return unpack(self.packed, self.bits, self.in_features)

    def _zero(self) -> Tensor | float:
        if self.fmt != "int":
            return 0.0
        return self.zero if self.zero is not None else float(2 ** (self.bits - 1))

    def dequantize_weight(self) -> Tensor:
        """(out, in) float32 weight, computed from the buffers on every call."""
        return dequantize_codes(
            self.codes(), self.scale, self._zero(), self.bits, self.fmt, self.group_size, self.g_idx, self.codebook
        )

    def to_quantized(self) -> QuantizedWeight:
        """The QuantizedWeight this layer stores (scales as stored, widened to float32)."""
        ones = torch.ones(self.out_features, self.n_groups, device=self.packed.device)
        zero = self._zero()
        return QuantizedWeight(
            codes=self.codes(),
            scale=ones if self.scale is None else self.scale.float(),
            zero=zero.float() if isinstance(zero, Tensor) else ones * zero,
            bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, fmt=self.fmt,
            g_idx=self.g_idx, codebook=None if self.codebook is None else self.codebook.float(),
        )

    def num_logical_params(self) -> int:
        """Parameters of the float layer this one replaces: in * out (+ out for the bias)."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None or self.input_shift is not None or self.input_scale is not None:
            self.last_path = "simulated"
            return self._forward_reference(self.quantized_input(x)).to(x.dtype)
        kernel = self._fast_kernel(x)
        if kernel is None:
            self.last_path = "reference"
            return self._forward_reference(x)
        self.last_path = kernel
        return self._forward_fast(x, kernel)

    def _forward_reference(self, x: Tensor) -> Tensor:
        weight = self.dequantize_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _fast_kernel(self, x: Tensor) -> str | None:
        """"int4", "int8", "native4", "native8" or None (reference) for this input."""
        if not self.use_fast_path or x.device.type != "cpu" or x.numel() == 0:
            return None
        if x.requires_grad and torch.is_grad_enabled():
            return None  # the kernels have no backward
        if x.numel() // self.in_features > self.fast_path_max_tokens:
            return None  # the reference path's dequantize + GEMM is faster for long inputs
        if x.dtype in _FAST_PATH_DTYPES:
            return self._static_kernel()
        if x.dtype != torch.float32:
            return None
        path = self._fp32_path()
        if path == "native" and self._native_operands() is not None:
            return f"native{self._native_operands().bits}"
        if path in ("native", "bf16"):  # a layer the native kernels cannot express may still have a packed kernel
            return self._static_kernel()
        return None

    def _fp32_path(self) -> str:
        """Where float32 inputs go: as set on the layer (`fast_path_casts_fp32_to_bf16`), else inside slimlm's
        generation runner the path measured fastest on this CPU (`slimlm.quant.kernels`)."""
        if self.fast_path_casts_fp32_to_bf16 is not None:
            return "bf16" if self.fast_path_casts_fp32_to_bf16 else "reference"
        return fp32_decode_path()

    def _native_operands(self) -> cpu_kernels.LowbitOperands | None:
        key = ("native",)
        if key not in self._kernel_cache:
            self._kernel_cache[key] = self._build_native_operands()
        return self._kernel_cache[key]

    def _build_native_operands(self) -> cpu_kernels.LowbitOperands | None:
        if self.fmt != "int" or self.packed is None or self.packed.device.type != "cpu" or cpu_kernels.load() is None:
            return None
        return cpu_kernels.quantized_operands(self.to_quantized())

    def _static_kernel(self) -> str | None:
        """The kernel this layer's format allows, independent of the input."""
        if self.fmt != "int" or self.packed is None or self.packed.device.type != "cpu":
            return None
        if (
            HAS_INT4_KERNEL
            and self.bits == 4
            and self.group_size in INT4_KERNEL_GROUP_SIZES
            and self.in_features % self.group_size == 0
            and self.out_features % 16 == 0
            and self._groups_in_order()
        ):
            return "int4"
        if HAS_INT8_KERNEL and self.bits == 8 and self.symmetric and self.group_size is None:
            return "int8"
        return None

    def _groups_in_order(self) -> bool:
        if self.g_idx is None:
            return True
        key = ("g_idx_trivial",)
        if key not in self._kernel_cache:
            expected = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
            self._kernel_cache[key] = torch.equal(self.g_idx.long(), expected)
        return self._kernel_cache[key]

    def _forward_fast(self, x: Tensor, kernel: str) -> Tensor:
        if kernel.startswith("native"):
            y = cpu_kernels.lowbit_matmul(x, self._native_operands())
            return y if self.bias is None else y + self.bias.float()
        compute_dtype = x.dtype if x.dtype in _FAST_PATH_DTYPES else torch.bfloat16  # fp32 by request
        rows = x.reshape(-1, self.in_features).to(compute_dtype).contiguous()
        if kernel == "int4":
            weight, scales_and_zeros = self._int4_operands(compute_dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, self.group_size, scales_and_zeros)
        else:
            weight, scales = self._int8_operands(compute_dtype)
            y = torch.ops.aten._weight_int8pack_mm(rows, weight, scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def _int4_operands(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = ("int4", dtype)
        if key not in self._kernel_cache:
            codes = self.codes().to(torch.int32)
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scale = self.scale.float()
            zero = self.zero.float() if self.zero is not None else torch.full_like(scale, 8.0)
            # The kernel computes (q - 8) * s + z; ours is scale * (q - zero).
            offset = scale * (8.0 - zero)
            scales_and_zeros = torch.stack([scale.t(), offset.t()], dim=-1).to(dtype).contiguous()
            self._kernel_cache[key] = (weight, scales_and_zeros)
        return self._kernel_cache[key]

    def _int8_operands(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = ("int8", dtype)
        if key not in self._kernel_cache:
            signed = (self.codes().to(torch.int16) - 128).to(torch.int8)
            self._kernel_cache[key] = (signed.contiguous(), self.scale[:, 0].to(dtype).contiguous())
        return self._kernel_cache[key]

    # ------------------------------------------------------------------------------------------
    # Keeping the kernel cache in step with the buffers
    # ------------------------------------------------------------------------------------------

    def clear_kernel_cache(self) -> None:
        """Drop the kernel-layout copies (rebuilt on the next fast forward); call after editing buffers."""
        self._kernel_cache.clear()

    def _apply(self, fn, *args, **kwargs):
        self.clear_kernel_cache()  # .to() / .half() / device moves replace the buffers
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.clear_kernel_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        grid = "symmetric" if self.symmetric else "asymmetric"
        extras = ", act-order" if self.g_idx is not None else ""
        extras += f", inputs: {self.input_quantizer.extra_repr()}" if self.input_quantizer is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"{group}, fmt={self.fmt}, {grid}{extras}, bias={self.bias is not None}"
        )


def _fits_float16(values: Tensor, what: str) -> bool:
    """Whether float16 keeps the values finite and, for scales, out of its imprecise subnormal range."""
    finfo = torch.finfo(torch.float16)
    magnitude = values.detach().abs().float()
    if bool((magnitude > finfo.max).any()):
        return False
    # A subnormal scale loses relative precision and every weight of its group shifts with it;
    # a codebook entry near zero only moves by < 6e-8, which is harmless.
    return what == "codebook entries" or not bool(((magnitude > 0) & (magnitude < finfo.tiny)).any())


def _storage_dtype(values: Tensor, requested: torch.dtype | None, what: str) -> torch.dtype:
    if requested is None:
        return torch.float16 if _fits_float16(values, what) else torch.float32
    if requested == torch.float16 and not _fits_float16(values, what):
        raise SlimlmError(
            f"{what} fall outside float16's normal range and would lose precision; "
            "pass scale_dtype=torch.float32 (or None to choose automatically)"
        )
    return requested
