"""LowRankLinear: a linear stored as two factors, y = (x down^T) up^T + b, optionally beside a base layer.

Two uses, one layer kind (`low_rank`):

- factorization (SVD, ASVD, LASER, LPLR): the factors replace the weight; the bias sits on `up`.
- error compensation (LoRC, EoRA): y = base(x) + (x down^T) up^T, where `base` is the compressed layer an
  earlier stage left (a `QuantizedLinear`, a pruned linear, ...) and keeps its own bias.

The factors are `nn.Linear` modules (`down`: in -> rank, `up`: rank -> out) or, when quantized (LPLR,
quantized corrections), `QuantizedLinear`s. A quantized correction stores `up` transposed (`up_transposed`:
a rank x out grid), so that each rank component, a column of up and a row of down, has its own scale. The
native checkpoint saves every part: this layer's metadata says which, and the compressed parts are
registered layers of their own, restored after it (`slimlm.export.native`). Bytes are
what the tensors hold; `count_parameters` counts the factors' and the base's parameters;
`matmul_flops_per_token` gives 2 r (in + out), plus the base's 2 in out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.registry import layer_kind, register_layer
from slimlm.errors import SlimlmError

META_VERSION = 1


@register_layer("low_rank")
class LowRankLinear(nn.Module):
    is_compressed_linear = True

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 base: nn.Module | None = None, dtype: torch.dtype = torch.float32, up_transposed: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.up_transposed = up_transposed
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        if up_transposed:  # holds up^T (rank x out); the bias, if any, is the base's
            self.up = nn.Linear(out_features, rank, bias=False, dtype=dtype)
        else:
            self.up = nn.Linear(rank, out_features, bias=bias and base is None, dtype=dtype)
        self.base = base

    @classmethod
    def from_factors(cls, up: Tensor, down: Tensor, bias: Tensor | None = None, base: nn.Module | None = None,
                     dtype: torch.dtype = torch.float32) -> LowRankLinear:
        """The layer computing x -> x down^T up^T (+ bias, or + base(x)); up is (out, r), down (r, in)."""
        out_features, rank = up.shape
        if down.shape[0] != rank:
            raise SlimlmError(f"factor shapes do not chain: up {tuple(up.shape)}, down {tuple(down.shape)}")
        if base is not None and bias is not None:
            raise SlimlmError("a compensated layer keeps its bias in the base layer")
        layer = cls(down.shape[1], out_features, rank, bias is not None, base, dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.down(x)
        if self.up_transposed:
            low_rank = torch.nn.functional.linear(hidden, dense_of(self.up).T.to(hidden.dtype))
        else:
            low_rank = self.up(hidden)
        return low_rank if self.base is None else self.base(x) + low_rank

    def up_factor(self) -> Tensor:
        """The dense (out, rank) left factor."""
        return dense_of(self.up).T if self.up_transposed else dense_of(self.up)

    def correction(self) -> Tensor:
        """The dense (out, in) matrix up @ down (without the base or the bias)."""
        return self.up_factor() @ dense_of(self.down)

    def dense_weight(self) -> Tensor:
        """The dense (out, in) weight this layer applies (base included)."""
        weight = self.correction()
        if self.base is not None:
            weight = weight + dense_of(self.base)
        return weight

    @property
    def bias(self) -> Tensor | None:
        if self.base is not None:
            return getattr(self.base, "bias", None)
        return None if self.up_transposed else self.up.bias

    def matmul_flops_per_token(self) -> int:
        base = 0 if self.base is None else 2 * self.in_features * self.out_features
        return 2 * self.rank * (self.in_features + self.out_features) + base

    def meta(self) -> dict:
        return {"kind": "low_rank", "version": META_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank,
                "bias": self.base is None and self.bias is not None,
                "up_transposed": self.up_transposed, "base": None if self.base is None else _part(self.base)}

    @classmethod
    def from_meta(cls, meta: dict, dtype: torch.dtype) -> LowRankLinear:
        if meta.get("version") != META_VERSION:
            raise SlimlmError(f"low-rank layer metadata version {meta.get('version')!r} is not supported "
                              f"(expected {META_VERSION}); re-save the model with this version of slimlm")
        base_meta, base = meta["base"], None
        if base_meta is not None:
            # A plain linear is rebuilt here; a compressed base is a registered layer of its own, which the
            # checkpoint restores right after this one (its name comes later in `compressed_modules`).
            base = nn.Linear(meta["in_features"], meta["out_features"], bias=base_meta["bias"], dtype=dtype) \
                if base_meta["kind"] == "linear" else nn.Identity()
        return cls(meta["in_features"], meta["out_features"], meta["rank"], meta["bias"], base, dtype,
                   meta.get("up_transposed", False))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _part(module: nn.Module) -> dict:
    kind = layer_kind(module)
    if kind is not None:
        return {"kind": kind}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "bias": module.bias is not None}
    raise SlimlmError(f"a {type(module).__name__} cannot be saved as the base of a low-rank layer")


def dense_of(module: nn.Module) -> Tensor:
    """The dense (out, in) float weight of a float or compressed linear."""
    for attribute in ("dense_weight", "dequantize_weight"):
        if callable(getattr(module, attribute, None)):
            return getattr(module, attribute)().float()
    return module.weight.float()
