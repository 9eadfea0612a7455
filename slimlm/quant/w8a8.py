"""`Int8Linear`: W8A8, int8 weights per output channel times int8 activations, with an integer GEMM.

The scheme of ZeroQuant (Yao et al., NeurIPS 2022: group-wise weights, token-wise activations;
here one group per output channel) and of LLM.int8()'s vector-wise quantization (Dettmers et al.,
NeurIPS 2022: a scale per row of X and per column of W^T; its outlier decomposition: `llm_int8.py`).

Weights: symmetric 8-bit grid of `slimlm.quant.grid`, one scale per output channel,
W^_ij = s_w,i q_ij with signed codes q_ij in [-128, 127]. Activations: `ActivationQuantizer`
(dynamic per token, or static per tensor; symmetric or asymmetric, 2 to 8 bits),
X^_tj = s_x,t (p_tj - z_t) with signed codes p. Then

    Y_ti = sum_j X^_tj W^_ij = s_x,t s_w,i ( sum_j p_tj q_ij  -  z_t sum_j q_ij )

The sum over j is one int8 x int8 -> int32 matrix multiply (`torch._int_mm`; on x86 CPUs PyTorch
sends it to oneDNN, which uses VNNI / AMX where the CPU has them); the zero-point term needs only
the row sums of the weight codes, computed once. |p|, |q| <= 128, so int32 holds
the sums exactly for in_features up to 2^31 / 2^14 = 131072 (the zero-point term is applied in
float32 after the conversion: its rank-1 update is much cheaper there than in int32 on CPU).

forward(x) has two paths computing the same integers:
- `int8` (default on CPU when `torch._int_mm` exists, no autograd): the integer GEMM, then one
  float32 rescale by the outer product s_x s_w^T; inputs of at most 8 tokens (decoding) take slimlm's
  compiled few-row kernels instead (`last_path` "int8-native"), which compute the same integers reading
  the weight once: with a symmetric activation grid the whole product in one call
  (`slimlm.quant.cpu_kernels.w8a8_matmul`: quantization, integer sums and rescale, bit for bit these
  operations), else the integer sums (`s8_few_rows`);
- `reference` (exact fake quantization, always available; under autograd the rounding passes no
  straight-through gradient, only the scales' dependence on x): dequantize X^ and W^ to float32 and
  call F.linear. It rounds each float product and partial sum, the int8 path only at the end, so
  they agree to float32 rounding of the accumulation (tests: rtol 1e-5).
Both return x's dtype; the quantization itself always runs in float32.

Buffers: `weight` (out, in) int8, `weight_scale` (out,) float32, `bias` (float, optional) and, for a
static activation grid, the calibrated range (`input_quantizer.observed_min` / `observed_max`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.core.dtypes import torch_dtype
from slimlm.core.registry import register_layer
from slimlm.errors import SlimlmError
from slimlm.quant import cpu_kernels
from slimlm.quant.activation import ActivationQuantizer, check_activation_settings
from slimlm.quant.grid import quantize_weight, signed_offset

META_VERSION = 1
WEIGHT_BITS = 8
_HAS_INT_MM = hasattr(torch, "_int_mm")
NATIVE_MAX_ROWS = 8  # inputs of at most this many tokens take slimlm's native integer kernel


def int8_weight(weight: Tensor, clip: str = "minmax") -> tuple[Tensor, Tensor]:
    """(out, in) signed int8 codes and (out,) float32 scales: the symmetric per-channel 8-bit grid."""
    qw = quantize_weight(weight.detach().float(), WEIGHT_BITS, None, symmetric=True, clip=clip,
                         granularity="channel")
    codes = (qw.codes.to(torch.int16) - signed_offset(WEIGHT_BITS)).to(torch.int8)
    return codes, qw.scale[:, 0].contiguous()


@register_layer("int8")
class Int8Linear(nn.Module):
    """y = x @ W.T + b with int8 weights and int8-quantized inputs; see the module docstring."""

    is_compressed_linear = True  # the architecture adapter treats it as the linear it replaces

    def __init__(self, in_features: int, out_features: int, activation_bits: int = 8,
                 granularity: str = "per_token", activation_symmetric: bool = True) -> None:
        super().__init__()
        check_activation_settings(activation_bits, granularity)
        self.in_features, self.out_features = in_features, out_features
        self.input_quantizer = ActivationQuantizer(activation_bits, granularity, activation_symmetric)
        self.use_int8_kernel = True
        self.last_path = "none"  # which path the latest forward took: "int8" or "reference"
        self._row_sums: Tensor | None = None  # sum_j q_ij for the zero-point term; never in the state dict
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", None)

    # ------------------------------------------------------------------------------------------
    # Construction and metadata
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, activation_bits: int = 8,
                   granularity: str = "per_token", activation_symmetric: bool = True,
                   clip: str = "minmax") -> Int8Linear:
        """Quantize a float (out, in) weight; the bias keeps its dtype."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, activation_bits, granularity, activation_symmetric)
        layer.weight, layer.weight_scale = int8_weight(weight, clip)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer.to(weight.device)

    @classmethod
    def from_meta(cls, meta: dict, dtype: torch.dtype) -> Int8Linear:
        """The empty layer a checkpoint's metadata describes (its scales and float16 weights keep their dtypes)."""
        return cls.empty(meta)

    @classmethod
    def empty(cls, meta: dict) -> Int8Linear:
        """A layer with the buffers `meta` describes, ready for load_state_dict."""
        if meta.get("version") != META_VERSION:
            raise SlimlmError(f"int8-layer metadata version {meta.get('version')!r} is not supported "
                              f"(expected {META_VERSION}); re-save the model with this version of slimlm")
        try:
            activations = meta["activations"]
            layer = cls(meta["in_features"], meta["out_features"], activations["bits"],
                        activations["granularity"], activations["symmetric"])
            if meta["bias_dtype"] is not None:
                bias_dtype = torch_dtype(meta["bias_dtype"], "int8-layer metadata")
                layer.bias = torch.zeros(layer.out_features, dtype=bias_dtype)
        except KeyError as missing:
            raise SlimlmError(f"int8-layer metadata lacks {missing}; re-save the model with Int8Linear.meta()") from None
        return layer

    def meta(self) -> dict:
        """JSON-serialisable description from which `empty` rebuilds the buffers."""
        return {
            "kind": "int8", "version": META_VERSION, "in_features": self.in_features,
            "out_features": self.out_features, "weight_bits": WEIGHT_BITS,
            "activations": self.input_quantizer.meta(),
            "bias_dtype": None if self.bias is None else str(self.bias.dtype).removeprefix("torch."),
        }

    def num_logical_params(self) -> int:
        """Parameters of the float layer this one replaces: in * out (+ out for the bias)."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def dequantize_weight(self) -> Tensor:
        """(out, in) float32 W^ = s_w q."""
        return self.weight.float() * self.weight_scale.float()[:, None]

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise SlimlmError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        y = self._product(x.reshape(-1, self.in_features), self._int8_applies(x))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _product(self, rows: Tensor, int8: bool) -> Tensor:
        """(tokens, out) float32 X^ W^T of (tokens, in) rows, without the bias; subclasses add terms."""
        self.last_path = "int8" if int8 else "reference"
        return self._forward_int8(rows) if int8 else self._forward_reference(rows)

    def _int8_applies(self, x: Tensor) -> bool:
        if not (self.use_int8_kernel and _HAS_INT_MM and x.device.type == "cpu" and x.numel()):
            return False
        return not (x.requires_grad and torch.is_grad_enabled())  # the integer GEMM has no backward

    def native_operands(self) -> cpu_kernels.Int8Operands | None:
        """This layer in the compiled W8A8 kernel's layout, or None where that kernel does not apply (an
        asymmetric or uncalibrated activation grid, no compiled kernels)."""
        quantizer = self.input_quantizer
        if (not quantizer.symmetric or quantizer.fmt != "int" or not quantizer.calibrated
                or self.weight.device.type != "cpu" or cpu_kernels.load() is None):
            return None
        static = float(quantizer.params(self.weight_scale[:0, None])[0]) if quantizer.static else None
        weight = self.weight if self.weight.is_contiguous() else self.weight.contiguous()
        return cpu_kernels.Int8Operands(weight, self.weight_scale.float().contiguous(), quantizer.bits, static)

    def _forward_int8(self, rows: Tensor) -> Tensor:
        native = self.native_operands() if rows.shape[0] <= NATIVE_MAX_ROWS else None
        if native is not None:
            self.last_path = "int8-native"
            return cpu_kernels.native_matmul_many(rows, (native,))
        codes, scale, zero = self.input_quantizer.quantize(rows)
        y = self._integer_product(codes).float()  # (tokens, out): the exact int32 sums
        if not self.input_quantizer.symmetric:
            # s (p - z) q^T = s (p q^T - z rowsum(q)): a rank-1 update, done in float because
            # PyTorch's int32 elementwise kernels are several times slower than the GEMM itself.
            y.addr_(zero.reshape(-1).float().expand(y.shape[0]), self._weight_row_sums(), alpha=-1)
        return y.mul_(scale).mul_(self.weight_scale.float())

    def _integer_product(self, codes: Tensor) -> Tensor:
        """The int32 sums p q^T: slimlm's few-row kernel for decode-sized inputs (the same integers, several
        times faster than torch._int_mm at one row), torch._int_mm otherwise."""
        if (codes.shape[0] <= NATIVE_MAX_ROWS and codes.dtype == torch.int8 and self.weight.is_contiguous()
                and cpu_kernels.load() is not None):
            self.last_path = "int8-native"
            return cpu_kernels.s8_few_rows(codes, self.weight)
        return torch._int_mm(codes, self.weight.t())

    def _forward_reference(self, rows: Tensor) -> Tensor:
        codes, scale, zero = self.input_quantizer.quantize(rows)
        return F.linear((codes.float() - zero) * scale, self.dequantize_weight())

    def _weight_row_sums(self) -> Tensor:
        if self._row_sums is None or self._row_sums.device != self.weight.device:
            self._row_sums = self.weight.to(torch.int32).sum(dim=1).float()  # |sum| <= 128 in: exact in float32 below 2^17 columns
        return self._row_sums

    # The cached row sums follow the weight buffer.
    def _apply(self, fn, *args, **kwargs):
        self._row_sums = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._row_sums = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights=int8 per-channel "
                f"symmetric, bias={self.bias is not None}")
