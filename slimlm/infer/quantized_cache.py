"""Quantized KV caches: shared storage, the naive per-token baseline, settings, chunked perplexity.

A quantized cache implements the `slimlm.infer.cache.KVCache` protocol with keys stored after
RoPE (`rotate_on_read = False`). It holds *packed* unsigned integer codes (the bit layout of
`slimlm.core.packing`: four 2-bit or two 4-bit codes per byte, eight 3-bit codes in 3 bytes),
float16 scales and zero points, and a full-precision window of recent tokens (model dtype). The
grid is the shared asymmetric integer grid of `slimlm.quant.grid` (`range_params`, `quantize`,
`dequantize`): value = scale * (code - zero), with the min-max range widened to contain 0 and an
integer zero point (the grid's rule; KIVI's reference code uses the raw min and max instead).
Scales are rounded to float16 *before* the codes are computed (so codes and stored scale agree)
and clamped to at least float16's smallest normal number, 2^-14.

`read(layer)` dequantizes every stored code on every call (nothing dequantized is kept), so
attention really sees quantized keys and values. The tokens written in the current step are
read back in full precision, as in KIVI's Algorithm 1 where the prefill attends to the
unquantized prompt and only the stored cache is quantized: a later step (a decode step or the
next perplexity chunk) sees the quantized codes.

Methods (`<method>-<bits>bit`, group size G, residual R):
- `naive` (this file, `NaiveQuantCache`): keys and values quantized per token on write, each
  head's head_dim channels split into groups of G consecutive channels with one scale/zero per
  group; no full-precision window.
- `kivi` (`slimlm.infer.kivi.KiviCache`): keys per channel over groups of G tokens, values per
  token, the most recent tokens kept in full precision.
- `kvquant` (`slimlm.infer.kvquant.KVQuantCache`): pre-RoPE per-channel keys and per-token values on
  a calibrated non-uniform (sensitivity-weighted k-means) datatype, ~1% outliers kept sparse in
  float16, the first token in full precision (`rotate_on_read = True`); needs a calibration
  (`slimlm.infer.kvquant.calibrate_kvquant`) carried by the spec. The group size does not apply.

Bytes per quantized token, per layer and KV head (head_dim D, bits b):
naive and KIVI alike hold 2 * D * b / 8 bytes of codes plus 2 * 2 * 2 * D / G bytes of float16
scales and zeros (keys: one scale+zero per channel per G tokens; values: one per G channels per
token), against 2 * 2 * D bytes in a float16 cache: a ratio of b / 16 + 2 / G (2 bits, G = 32:
0.1875). The full-precision window adds up to R + G tokens (KIVI) at the model's element size.

Batches of different lengths work: every sequence has its own storage; `read` pads to the longest.
`truncate` (speculative decoding's roll-back) is refused: quantized chunks cannot be cut back.

`chunked_logits` feeds a text through one cache in chunks and yields each chunk's logits;
`chunked_nll` (perplexity) and `chunked_kl` (mean KL(float cache || quantized cache) and top-1
agreement of the next-token distributions, both runs chunked the same way) are built on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from slimlm.core.packing import pack, packed_bytes, unpack
from slimlm.errors import SlimlmError
from slimlm.infer.cache import CacheShape, _check_counts
from slimlm.quant.grid import dequantize, quantize, range_params

KV_METHODS = ("naive", "kivi", "kvquant")
KV_BITS = (2, 3, 4, 8)
_FP16_MIN_SCALE = 2.0 ** -14
_NAME = re.compile(r"^(?P<method>[a-z]+)-(?P<bits>\d+)bit$")


@dataclass(frozen=True)
class KVQuantSpec:
    method: str
    bits: int
    group_size: int = 32
    residual: int = 128  # KIVI only
    outliers: float = 0.01  # KVQuant only: fraction of values kept sparse in float16
    # KVQuant only: the offline calibration (slimlm.infer.kvquant.KVQuantCalibration); not part of equality
    calibration: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in KV_METHODS:
            raise SlimlmError(f"unknown KV cache quantization {self.method!r}: choose one of {', '.join(KV_METHODS)}")
        if self.bits not in KV_BITS:
            raise SlimlmError(f"KV cache quantization supports {', '.join(map(str, KV_BITS))} bits (got {self.bits})")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise SlimlmError(f"KV group size must be a positive integer, got {self.group_size!r}")
        if self.method == "kivi":
            if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
                raise SlimlmError(f"KIVI residual must be an integer >= 0, got {self.residual!r}")
            if self.residual % self.group_size:
                raise SlimlmError(f"KIVI residual ({self.residual}) must be a multiple of the group size "
                                  f"({self.group_size}): keys are quantized in chunks of group-size tokens")
            if (self.group_size * self.bits) % 8:
                raise SlimlmError(f"KIVI packs a key channel's {self.group_size} tokens of {self.bits} bits into whole "
                                  "bytes: choose a group size whose product with bits is a multiple of 8")
        if self.method == "kvquant":
            outliers = self.outliers
            if isinstance(outliers, bool) or not isinstance(outliers, (int, float)) or not 0 <= outliers < 0.5:
                raise SlimlmError(f"KVQuant outlier fraction must be a number in [0, 0.5), got {outliers!r} "
                                  "(the paper keeps 0.01)")

    @property
    def name(self) -> str:
        return f"{self.method}-{self.bits}bit"

    def check_head_dim(self, head_dim: int) -> None:
        if self.method == "kvquant":
            return  # no groups: keys per channel (calibrated), values per token over all KV heads
        if head_dim % self.group_size:
            raise SlimlmError(f"KV group size {self.group_size} does not divide the head dimension {head_dim}: "
                              f"choose a divisor of {head_dim} (--kv-group-size)")
        if (head_dim * self.bits) % 8:
            raise SlimlmError(f"head dimension {head_dim} at {self.bits} bits does not fill whole bytes")


def parse_kv_cache(name: str, group_size: int = 32, residual: int = 128, outliers: float = 0.01,
                   calibration: Any = None) -> KVQuantSpec:
    """`naive-4bit`, `kivi-2bit`, `kvquant-3bit`, ... -> a checked KVQuantSpec."""
    match = _NAME.match(name or "")
    if match is None:
        raise SlimlmError(f"KV cache {name!r} is not <method>-<bits>bit (e.g. kivi-2bit, naive-4bit, kvquant-3bit)")
    return KVQuantSpec(match["method"], int(match["bits"]), group_size, residual, outliers, calibration)


# ---------------------------------------------------------------------------------------------
# Quantizers (the shared grid; packing along the last axis)
# ---------------------------------------------------------------------------------------------


def _params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = range_params(xmin, xmax, bits, symmetric=False)
    return scale.clamp(min=_FP16_MIN_SCALE).half(), zero.half()


def quantize_groups_last(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., n]: one scale/zero per group of `group` consecutive entries of the last axis.
    Returns packed codes [..., packed_bytes(n, bits)] uint8, scale and zero [..., n / group] float16."""
    *lead, n = x.shape
    grouped = x.float().reshape(*lead, n // group, group)
    scale, zero = _params(grouped.amin(-1), grouped.amax(-1), bits)
    codes = quantize(grouped, scale.float()[..., None], zero.float()[..., None], bits).reshape(-1, n)
    return pack(codes, bits).reshape(*lead, -1), scale, zero


def dequantize_groups_last(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, n: int,
                           dtype: torch.dtype) -> torch.Tensor:
    *lead, _ = packed.shape
    codes = unpack(packed.reshape(-1, packed.shape[-1]), bits, n).reshape(*lead, scale.shape[-1], -1)
    return dequantize(codes, scale.float()[..., None], zero.float()[..., None]).reshape(*lead, n).to(dtype)


class PerTokenStore:
    """One sequence's tokens of one layer quantized per token: codes [heads, tokens, D*b/8],
    scale/zero [heads, tokens, D/G] float16, grown as tokens arrive."""

    def __init__(self, heads: int, head_dim: int, bits: int, group: int, device: torch.device | str = "cpu"):
        self.head_dim, self.bits, self.group = head_dim, bits, group
        self.codes = torch.empty(heads, 0, packed_bytes(head_dim, bits), dtype=torch.uint8, device=device)
        self.scale = torch.empty(heads, 0, head_dim // group, dtype=torch.float16, device=device)
        self.zero = torch.empty_like(self.scale)

    def append(self, x: torch.Tensor) -> None:
        """x [heads, tokens, D]."""
        codes, scale, zero = quantize_groups_last(x, self.bits, self.group)
        self.codes = torch.cat([self.codes, codes], dim=1)
        self.scale = torch.cat([self.scale, scale], dim=1)
        self.zero = torch.cat([self.zero, zero], dim=1)

    @property
    def tokens(self) -> int:
        return self.codes.shape[1]

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_groups_last(self.codes, self.scale, self.zero, self.bits, self.head_dim, dtype)

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (self.codes, self.scale, self.zero))


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# The shared cache skeleton
# ---------------------------------------------------------------------------------------------


class QuantizedCacheBase:
    """Per-sequence, per-layer storage; subclasses define `_append(layer, b, k, v)`, `_dequantized(layer, b)`
    (keys, values [heads, tokens, D] in stored order), `_layer_bytes(layer, b)` and `_clear(b)`."""

    rotate_on_read = False

    def __init__(self, shape: CacheShape, batch: int, spec: KVQuantSpec):
        if batch < 1:
            raise SlimlmError(f"cache needs a positive batch (got {batch})")
        spec.check_head_dim(shape.head_dim)
        self.shape, self.batch, self.spec = shape, batch, spec
        self.lengths = [0] * batch
        self._starts, self._counts = [0] * batch, [0] * batch
        self._fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this step's full-precision keys/values

    def reserve(self, counts: list[int]) -> list[int]:
        _check_counts(counts, self.batch)
        self._starts, self._counts = list(self.lengths), list(counts)
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]
        self._fresh = {}
        return list(self._starts)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._fresh[layer] = (keys, values)
        for b, count in enumerate(self._counts):
            if count:
                self._append(layer, b, keys[b, :, :count], values[b, :, :count])

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = max(1, max(self.lengths))
        heads, dim = self.shape.kv_heads[layer], self.shape.head_dim
        out_k = torch.zeros(self.batch, heads, span, dim, dtype=self.shape.dtype, device=self.shape.device)
        out_v = torch.zeros_like(out_k)
        fresh = self._fresh.get(layer)
        for b in range(self.batch):
            if not self.lengths[b]:
                continue
            k, v = self._dequantized(layer, b)
            out_k[b, :, :k.shape[1]], out_v[b, :, :v.shape[1]] = k, v
            count, start = self._counts[b], self._starts[b]
            if fresh is not None and count:  # the step's own tokens: full precision (KIVI Algorithm 1)
                out_k[b, :, start:start + count] = fresh[0][b, :, :count]
                out_v[b, :, start:start + count] = fresh[1][b, :, :count]
        return out_k, out_v

    def truncate(self, sequence: int, length: int) -> None:
        if length < self.lengths[sequence]:
            raise SlimlmError("a quantized KV cache cannot be rolled back (speculative decoding): "
                              "use the contiguous or paged cache")

    def release(self, sequence: int) -> None:
        """A finished sequence's storage is freed (its later steps, with count 0, attend to nothing)."""
        self._clear(sequence)
        self.lengths[sequence] = 0

    def bytes_held(self) -> int:
        return sum(self._layer_bytes(layer, b) for layer in range(self.shape.layers) for b in range(self.batch))

    def bytes_wasted(self) -> int:
        return 0  # storage grows token by token (chunk by chunk): no slot without a token

    def float16_bytes(self) -> int:
        """What a float16 cache of the same tokens would hold (keys + values, all layers)."""
        return sum(self.lengths) * sum(2 * h * self.shape.head_dim * 2 for h in self.shape.kv_heads)

    def token_bytes(self) -> int:
        """Bytes of one *quantized* token (codes + float16 scales/zeros, keys + values, all layers)."""
        d, b, g = self.shape.head_dim, self.spec.bits, self.spec.group_size
        return sum(h * (2 * d * b // 8 + 8 * d // g) for h in self.shape.kv_heads)

    def bytes_per_token(self) -> float:
        """Measured: bytes held / tokens held (the full-precision window included)."""
        tokens = sum(self.lengths)
        return self.bytes_held() / tokens if tokens else 0.0


class LayerStoreCache(QuantizedCacheBase):
    """A quantized cache whose storage is one store per layer and sequence (`_new(layer)`), each with
    `append(keys, values)`, `read(dtype)` and `nbytes()`."""

    def _init_stores(self) -> None:
        self.layers = [[self._new(layer) for _ in range(self.batch)] for layer in range(self.shape.layers)]

    def _new(self, layer: int):
        raise NotImplementedError

    def _append(self, layer, b, k, v) -> None:
        self.layers[layer][b].append(k, v)

    def _dequantized(self, layer, b):
        return self.layers[layer][b].read(self.shape.dtype)

    def _layer_bytes(self, layer, b) -> int:
        return self.layers[layer][b].nbytes()

    def _clear(self, b) -> None:
        for layer in range(self.shape.layers):
            self.layers[layer][b] = self._new(layer)


class NaiveQuantCache(QuantizedCacheBase):
    """Naive baseline: keys and values quantized per token (groups of G channels) on write."""

    def __init__(self, shape: CacheShape, batch: int, spec: KVQuantSpec):
        if spec.method != "naive":
            raise SlimlmError(f"NaiveQuantCache needs a naive spec, got {spec.name}")
        super().__init__(shape, batch, spec)
        self._new_stores = lambda h: PerTokenStore(h, shape.head_dim, spec.bits, spec.group_size, shape.device)
        self.keys = [[self._new_stores(h) for _ in range(batch)] for h in shape.kv_heads]
        self.values = [[self._new_stores(h) for _ in range(batch)] for h in shape.kv_heads]

    def _append(self, layer, b, k, v) -> None:
        self.keys[layer][b].append(k)
        self.values[layer][b].append(v)

    def _dequantized(self, layer, b):
        return self.keys[layer][b].read(self.shape.dtype), self.values[layer][b].read(self.shape.dtype)

    def _layer_bytes(self, layer, b) -> int:
        return self.keys[layer][b].nbytes() + self.values[layer][b].nbytes()

    def _clear(self, b) -> None:
        for layer, h in enumerate(self.shape.kv_heads):
            self.keys[layer][b], self.values[layer][b] = self._new_stores(h), self._new_stores(h)


def make_quantized_cache(shape: CacheShape, batch: int, spec: KVQuantSpec):
    if spec.method == "kvquant":
        from slimlm.infer.kvquant import KVQuantCache

        return KVQuantCache(shape, batch, spec)
    if spec.method == "kivi":
        from slimlm.infer.kivi import KiviCache

        return KiviCache(shape, batch, spec)
    return NaiveQuantCache(shape, batch, spec)


def check_chunk(chunk: int) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise SlimlmError(f"chunk must be a positive number of tokens, got {chunk!r}")


@torch.no_grad()
def chunked_logits(runner, ids: torch.Tensor, chunk: int,
                   spec: KVQuantSpec | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Feed `ids` (1-D) in chunks of `chunk` tokens through one cache (a quantized one for `spec`, else a float
    contiguous cache) and yield, per chunk, (logits [n, vocab], targets [n]) of its next-token predictions
    (the last token of the text predicts nothing): later chunks attend to the stored (quantized) keys and
    values of earlier ones; a chunk attends to its own tokens in full precision."""
    from slimlm.infer.cache import ContiguousCache

    check_chunk(chunk)
    if ids.numel() < 2:
        raise SlimlmError("chunked perplexity needs at least 2 tokens")
    shape = runner.cache_shape()
    cache = make_quantized_cache(shape, 1, spec) if spec else ContiguousCache(shape, 1, ids.numel())
    ids = ids.to(runner.device)
    for start in range(0, ids.numel() - 1, chunk):
        piece = ids[start:start + chunk]
        logits = runner.forward(piece[None], [piece.numel()], cache, all_logits=True)[0]
        targets = ids[start + 1:start + 1 + piece.numel()]
        yield logits[:targets.numel()], targets


def chunked_nll(runner, ids: torch.Tensor, chunk: int, spec: KVQuantSpec | None = None) -> torch.Tensor:
    """Per-token NLL (len - 1,) of `ids` (1-D) through `chunked_logits`."""
    return torch.cat([F.cross_entropy(logits.float(), targets, reduction="none")
                      for logits, targets in chunked_logits(runner, ids, chunk, spec)])


@dataclass(frozen=True)
class ChunkedKL:
    kl_mean: float  # mean over predictions of KL(float cache || quantized cache), nats
    top1_agreement: float  # fraction of predictions whose argmax agrees
    tokens: int  # predictions scored


def chunked_kl(runner, ids: torch.Tensor, chunk: int, spec: KVQuantSpec) -> ChunkedKL:
    """KL(float-cache logits || `spec`-cache logits) of every next-token prediction of `ids` (1-D, or 2-D:
    one text per row, e.g. perplexity windows), both runs fed in the same chunks (`chunked_logits`)."""
    if spec is None:
        raise SlimlmError("chunked_kl compares a quantized KV cache with the float cache: give a spec")
    rows = ids[None] if ids.dim() == 1 else ids
    total_kl, agree, count = 0.0, 0, 0
    for row in rows:
        pairs = zip(chunked_logits(runner, row, chunk, None), chunked_logits(runner, row, chunk, spec))
        for (exact, _), (approx, _) in pairs:
            log_p, log_q = F.log_softmax(exact.float(), -1), F.log_softmax(approx.float(), -1)
            total_kl += (log_p.exp() * (log_p - log_q)).sum(-1).double().sum().item()
            agree += int((exact.argmax(-1) == approx.argmax(-1)).sum())
            count += exact.shape[0]
    return ChunkedKL(total_kl / count, agree / count, count)


def chunked_perplexity(runner, token_ids: list[int], chunk: int, spec: KVQuantSpec | None = None) -> float:
    """exp(mean NLL) of `chunked_nll` over every next-token prediction (len - 1 of them)."""
    nll = chunked_nll(runner, torch.tensor(token_ids, dtype=torch.long), chunk, spec)
    return math.exp(nll.double().mean().item())
