"""KV caches for slimlm's own decoder runner: one protocol, a contiguous cache, a paged cache.

Every cache holds, for each decoder layer, the keys and values of a batch of sequences that may
have different lengths. A forward step works in three calls:

1. `reserve(counts)`: room for `counts[b]` new tokens of sequence b; returns the cache index at
   which each sequence's new tokens start (its length before the step). A cache that evicts
   (`slimlm.infer.streaming.SinkWindowCache`) evicts here.
2. `write(layer, keys, values)`: the new keys/values, right-padded to the longest `counts[b]`,
   shape [batch, kv_heads, new, head_dim]; written at the reserved slots.
3. `read(layer)`: keys and values for attention, shape [batch, kv_heads, span, head_dim], where
   `span >= max(lengths)`; slot j of sequence b is valid iff j < lengths[b] (the runner masks
   the rest, so padding never reaches the softmax).

`rotate_on_read` says whether keys are stored before the rotary embedding (then the runner rotates
them at their cache positions on every read: the attention-sinks scheme) or after it.

Memory accounting (bytes of key and value tensors; the paged pool's block table is not counted):
- `bytes_held()`: bytes of KV storage this cache keeps for its sequences;
- `bytes_wasted()`: held bytes that hold no token (padding, unused capacity, block slack).

`ContiguousCache`: one preallocated tensor per layer, [batch, kv_heads, capacity, head_dim];
every sequence owns `capacity` slots, so a mixed-length batch wastes the padding up to the longest
sequence plus the capacity no sequence reached. `read` returns a view (no copy).

`PagedCache` (vLLM's PagedAttention, Kwon et al., 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention", Sec. 4.1-4.2): KV storage is a shared pool of
fixed-size blocks ([num_blocks, block_size, kv_heads, head_dim] per layer, token-major so a write is
one scatter into a view); each sequence has a
block table (logical block i -> physical block), blocks are taken from a free list on demand and
returned when a sequence finishes (`release`) or is rolled back (`truncate`). Only the last block
of a sequence can be partly empty, so waste is under one block per sequence. Deviation: PyTorch
has no paged attention kernel on CPU, so `read` gathers a sequence's blocks into a dense tensor
(one `index_select` per layer and step) before the fused attention.

Quantized KV caches (a naive per-token baseline, KIVI and KVQuant) implement the same protocol:
`slimlm.infer.quantized_cache`, `slimlm.infer.kivi` and `slimlm.infer.kvquant` (which stores keys before RoPE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class CacheShape:
    """What every cache needs to know about the model: per-layer KV heads and head dimension."""

    layers: int
    kv_heads: tuple[int, ...]  # per layer (structured pruning can leave blocks with different counts)
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def token_bytes(self) -> int:
        """Bytes of keys plus values one token takes over all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * heads * self.head_dim * element for heads in self.kv_heads)


class KVCache(Protocol):
    rotate_on_read: bool
    lengths: list[int]

    def reserve(self, counts: list[int]) -> list[int]: ...
    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None: ...
    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def truncate(self, sequence: int, length: int) -> None: ...
    def release(self, sequence: int) -> None: ...
    def bytes_held(self) -> int: ...
    def bytes_wasted(self) -> int: ...


def _check_counts(counts: list[int], batch: int) -> None:
    if len(counts) != batch or min(counts) < 0:
        raise SlimlmError(f"expected {batch} non-negative token counts, got {counts}")


class ContiguousCache:
    """One [batch, kv_heads, capacity, head_dim] tensor per layer for keys and one for values."""

    rotate_on_read = False

    def __init__(self, shape: CacheShape, batch: int, capacity: int):
        if capacity < 1 or batch < 1:
            raise SlimlmError(f"cache needs a positive batch and capacity (got {batch}, {capacity})")
        self.shape, self.batch, self.capacity = shape, batch, capacity
        self.keys = [torch.zeros(batch, h, capacity, shape.head_dim, dtype=shape.dtype, device=shape.device)
                     for h in shape.kv_heads]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = [0] * batch
        self._starts: list[int] = [0] * batch
        self._counts: list[int] = [0] * batch

    def reserve(self, counts: list[int]) -> list[int]:
        _check_counts(counts, self.batch)
        ends = [n + c for n, c in zip(self.lengths, counts)]
        if max(ends) > self.capacity:
            raise SlimlmError(f"contiguous KV cache full: {max(ends)} tokens needed, capacity {self.capacity}")
        self._starts, self._counts = list(self.lengths), list(counts)
        self.lengths = ends
        return list(self._starts)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        for b, (start, count) in enumerate(zip(self._starts, self._counts)):
            if count:
                self.keys[layer][b, :, start:start + count] = keys[b, :, :count]
                self.values[layer][b, :, start:start + count] = values[b, :, :count]

    def write_tokens(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """`write` of a step of a batch-1 cache: keys and values [new, kv_heads, head_dim]."""
        start, new = self._starts[0], keys.shape[0]
        if new == 1:
            self.keys[layer][0, :, start].copy_(keys[0])
            self.values[layer][0, :, start].copy_(values[0])
        else:
            self.keys[layer][0, :, start:start + new].copy_(keys.transpose(0, 1))
            self.values[layer][0, :, start:start + new].copy_(values.transpose(0, 1))

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = max(1, max(self.lengths))
        return self.keys[layer][:, :, :span], self.values[layer][:, :, :span]

    def truncate(self, sequence: int, length: int) -> None:
        self.lengths[sequence] = min(self.lengths[sequence], length)

    def release(self, sequence: int) -> None:
        # Contiguous storage belongs to the batch: nothing can be given back until the whole cache goes,
        # and the finished sequence's keys stay readable (a step with count 0 still attends to them).
        return None

    def bytes_held(self) -> int:
        return self.batch * self.capacity * self.shape.token_bytes()

    def bytes_wasted(self) -> int:
        return self.bytes_held() - sum(self.lengths) * self.shape.token_bytes()


class PagedCache:
    """A shared pool of fixed-size KV blocks with a block table per sequence (PagedAttention)."""

    rotate_on_read = False

    def __init__(self, shape: CacheShape, batch: int, num_blocks: int, block_size: int = 16):
        if block_size < 1 or num_blocks < 1 or batch < 1:
            raise SlimlmError(f"paged cache needs positive batch, blocks and block size "
                              f"(got {batch}, {num_blocks}, {block_size})")
        self.shape, self.batch, self.block_size, self.num_blocks = shape, batch, block_size, num_blocks
        self.key_pool = [torch.zeros(num_blocks, block_size, h, shape.head_dim, dtype=shape.dtype,
                                     device=shape.device) for h in shape.kv_heads]
        self.value_pool = [torch.zeros_like(k) for k in self.key_pool]
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives block 0 first
        self.block_tables: list[list[int]] = [[] for _ in range(batch)]
        self.lengths = [0] * batch
        self._slots: list[torch.Tensor] = []  # per sequence: flat pool slots of the tokens being written
        self._table: torch.Tensor | None = None  # padded block table of the current step

    @classmethod
    def for_lengths(cls, shape: CacheShape, max_lengths: list[int], block_size: int = 16) -> "PagedCache":
        """A pool just large enough for every sequence to reach its own maximum length."""
        blocks = sum(math.ceil(n / block_size) for n in max_lengths)
        return cls(shape, len(max_lengths), max(1, blocks), block_size)

    def reserve(self, counts: list[int]) -> list[int]:
        _check_counts(counts, self.batch)
        starts = list(self.lengths)
        self._slots = []
        for b, count in enumerate(counts):
            end = starts[b] + count
            while len(self.block_tables[b]) * self.block_size < end:
                if not self.free_blocks:
                    raise SlimlmError(f"paged KV cache out of blocks ({self.num_blocks} of {self.block_size} "
                                      "tokens): give it more blocks")
                self.block_tables[b].append(self.free_blocks.pop())
            positions = torch.arange(starts[b], end, device=self.shape.device)
            table = torch.tensor(self.block_tables[b], dtype=torch.long, device=self.shape.device)
            self._slots.append(table[positions // self.block_size] * self.block_size + positions % self.block_size)
            self.lengths[b] = end
        self._table = None
        return starts

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        key_pool, value_pool = self.key_pool[layer], self.value_pool[layer]
        key_slots = key_pool.view(-1, *key_pool.shape[2:])  # [num_blocks * block_size, heads, dim], a view
        value_slots = value_pool.view(-1, *value_pool.shape[2:])
        for b, slots in enumerate(self._slots):
            if len(slots):
                key_slots[slots] = keys[b, :, :len(slots)].transpose(0, 1)
                value_slots[slots] = values[b, :, :len(slots)].transpose(0, 1)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._padded_table()
        return self._gather(self.key_pool[layer], table), self._gather(self.value_pool[layer], table)

    def _padded_table(self) -> torch.Tensor:
        """[batch, max blocks] physical block ids; missing entries point at block 0 (masked out by length)."""
        if self._table is None:
            width = max(1, max(len(t) for t in self.block_tables))
            self._table = torch.tensor([t + [0] * (width - len(t)) for t in self.block_tables], dtype=torch.long,
                                       device=self.shape.device)  # index_select wants the pool's device
        return self._table

    def _gather(self, pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        batch, width = table.shape
        blocks = pool.index_select(0, table.reshape(-1))  # [batch * width, block, heads, dim]
        return blocks.view(batch, width * self.block_size, *pool.shape[2:]).transpose(1, 2)

    def truncate(self, sequence: int, length: int) -> None:
        """Keep the first `length` tokens; blocks past them go back to the free list."""
        self.lengths[sequence] = min(self.lengths[sequence], length)
        keep = math.ceil(self.lengths[sequence] / self.block_size)
        table = self.block_tables[sequence]
        while len(table) > keep:
            self.free_blocks.append(table.pop())
        self._table = None

    def release(self, sequence: int) -> None:
        """A finished sequence gives all its blocks back to the pool."""
        self.truncate(sequence, 0)

    def blocks_in_use(self) -> int:
        return sum(len(t) for t in self.block_tables)

    def bytes_held(self) -> int:
        return self.blocks_in_use() * self.block_size * self.shape.token_bytes()

    def bytes_wasted(self) -> int:
        return self.bytes_held() - sum(self.lengths) * self.shape.token_bytes()

    def pool_bytes(self) -> int:
        """The whole preallocated pool (shared: a server hands freed blocks to the next request)."""
        return self.num_blocks * self.block_size * self.shape.token_bytes()
