"""SparseLinear: a pruned linear stored in a compressed sparse form, with its real size.

Two layouts, chosen from the weight's pattern:

- `n:m` (semi-structured): for each row, the N kept values of every M-group, in order
  (`values`, (out, in * N / M), the float dtype), and each value's position inside its group
  (`indices`, ceil(log2 M) bits each, bit-packed with slimlm's packing: 2 bits for 2:4, 3 for 4:8).
  The same information as NVIDIA's 2:4 metadata, in a row-major layout of slimlm's own.
- `csr` (unstructured): compressed sparse rows: `crow_indices` (out + 1, int32), `col_indices`
  (nnz, int16 when in_features < 32768, else int32) and `values` (nnz).

The forward rebuilds the dense weight and runs `F.linear` (the exact reference path; dense CPU
matmul gains nothing from zeros), or with `use_sparse_kernel` multiplies the CSR matrix through
`torch.sparse.mm`. `from_dense` refuses a weight whose zeros do not fit the asked pattern.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.core.blocks import linear_weight, replace_module
from slimlm.core.dtypes import torch_dtype
from slimlm.core.packing import pack, unpack
from slimlm.core.registry import register_layer
from slimlm.core.sparsity import PRUNED, check_n_m
from slimlm.errors import SlimlmError

META_VERSION = 1


@register_layer("sparse")
class SparseLinear(nn.Module):
    is_compressed_linear = True

    def __init__(self, in_features: int, out_features: int, layout: str, nnz: int, n_m: tuple[int, int] | None = None,
                 dtype: torch.dtype = torch.float32, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.layout, self.n_m = in_features, out_features, layout, n_m
        self.use_sparse_kernel = False
        if layout == "n:m":
            n, m = n_m
            kept = in_features * n // m
            self.index_bits = max(1, math.ceil(math.log2(m)))
            self.register_buffer("values", torch.zeros(out_features, kept, dtype=dtype))
            self.register_buffer("indices", torch.zeros(out_features, math.ceil(kept * self.index_bits / 8), dtype=torch.uint8))
        elif layout == "csr":
            index_dtype = torch.int16 if in_features < 2**15 else torch.int32
            self.register_buffer("values", torch.zeros(nnz, dtype=dtype))
            self.register_buffer("col_indices", torch.zeros(nnz, dtype=index_dtype))
            self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int32))
        else:
            raise SlimlmError(f"unknown sparse layout {layout!r}: use 'n:m' or 'csr'")
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, n_m: tuple[int, int] | None = None) -> SparseLinear:
        """Store an (out, in) weight: N:M packed when `n_m` is given (checked), else CSR."""
        weight = weight.detach()
        out_features, in_features = weight.shape
        if n_m is not None:
            n, m = n_m
            if in_features % m or not check_n_m(weight, n, m):
                raise SlimlmError(f"the weight does not hold {n}:{m} sparsity: store it as CSR (n_m=None)")
            layer = cls(in_features, out_features, "n:m", out_features * in_features * n // m, n_m, weight.dtype, bias is not None)
            groups = weight.reshape(out_features, in_features // m, m)
            # The N positions of each group to keep: its non-zeros, padded with zero positions if fewer.
            order = torch.sort((groups != 0).to(torch.int8), dim=2, descending=True, stable=True)[1][:, :, :n]
            position = torch.sort(order, dim=2)[0]
            layer.values.copy_(groups.gather(2, position).reshape(out_features, -1))
            layer.indices.copy_(pack(position.reshape(out_features, -1).to(torch.uint8), layer.index_bits))
        else:
            with warnings.catch_warnings():  # "CSR support is in beta": the layout itself is what we rely on
                warnings.simplefilter("ignore", UserWarning)
                csr = weight.to_sparse_csr()
            layer = cls(in_features, out_features, "csr", int(csr.values().numel()), None, weight.dtype, bias is not None)
            layer.values.copy_(csr.values())
            layer.col_indices.copy_(csr.col_indices().to(layer.col_indices.dtype))
            layer.crow_indices.copy_(csr.crow_indices().to(torch.int32))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def dense_weight(self) -> Tensor:
        if self.layout == "n:m":
            n, m = self.n_m
            groups = self.in_features // m
            position = unpack(self.indices, self.index_bits, groups * n).long().reshape(self.out_features, groups, n)
            dense = torch.zeros(self.out_features, groups, m, dtype=self.values.dtype, device=self.values.device)
            dense.scatter_(2, position, self.values.reshape(self.out_features, groups, n))
            return dense.reshape(self.out_features, self.in_features)
        return self._csr().to_dense()

    def _csr(self) -> Tensor:
        return torch.sparse_csr_tensor(self.crow_indices.long(), self.col_indices.long(), self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_sparse_kernel and self.layout == "csr" and x.dtype == self.values.dtype:
            flat = x.reshape(-1, self.in_features)
            out = torch.sparse.mm(self._csr(), flat.T).T.reshape(*x.shape[:-1], self.out_features)
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @property
    def weight(self) -> Tensor:
        """The dense weight, for code that reads `.weight` (rebuilt on each access)."""
        return self.dense_weight()

    def num_logical_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def num_nonzero_params(self) -> int:
        return int(torch.count_nonzero(self.values)) + (self.out_features if self.bias is not None else 0)

    def meta(self) -> dict:
        return {"kind": "sparse", "version": META_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "layout": self.layout, "nnz": int(self.values.numel()),
                "n_m": list(self.n_m) if self.n_m else None, "dtype": str(self.values.dtype).removeprefix("torch."),
                "bias": self.bias is not None}

    @classmethod
    def from_meta(cls, meta: dict, dtype: torch.dtype) -> SparseLinear:
        return cls.empty(meta).to(dtype)

    @classmethod
    def empty(cls, meta: dict) -> SparseLinear:
        if meta.get("version") != META_VERSION:
            raise SlimlmError(f"sparse-layer metadata version {meta.get('version')!r} is not supported "
                              f"(expected {META_VERSION}); re-save the model with this version of slimlm")
        return cls(meta["in_features"], meta["out_features"], meta["layout"], meta["nnz"],
                   tuple(meta["n_m"]) if meta["n_m"] else None, torch_dtype(meta["dtype"], "sparse-layer metadata"),
                   meta["bias"])

    def extra_repr(self) -> str:
        pattern = f"{self.n_m[0]}:{self.n_m[1]}" if self.n_m else "csr"
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={pattern}, nnz={self.values.numel()}"


def sparsify_model_(model: nn.Module, n_m: tuple[int, int] | None = None) -> int:
    """Replace every pruned linear (marked by a pruning stage) by its SparseLinear; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if getattr(module, PRUNED, False) and not getattr(module, "is_compressed_linear", False):
            sparse = SparseLinear.from_dense(linear_weight(module), getattr(module, "bias", None), n_m)
            replace_module(model, name, sparse)
            replaced += 1
    return replaced
