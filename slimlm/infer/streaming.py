"""Streaming past the context window: sliding-window attention with attention sinks.

StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks",
Sec. 3.2 and Fig. 4): the KV cache keeps the first `sink` tokens (the attention sinks: the softmax
dumps surplus attention there, and evicting them breaks the model) plus the `window` most recent
tokens; tokens in between are evicted. Positions are assigned *within the cache*: a cache holding
[t0 t1 t2 t3 | t20 ... t27] gives them positions 0..11 and the next token position 12, whatever
their positions in the original text. RoPE keys are therefore stored *before* the rotary
embedding and rotated at their current cache slot on every read (`rotate_on_read = True`), as the
paper's implementation does.

Cache size: after eviction the cache holds at most `sink + window` tokens including the tokens of
the current step, so a step of one token attends to `sink` sinks and the `window - 1` tokens
before it plus itself. A step may add at most `window` tokens (longer prompts are fed in chunks).
`sink = 0` gives plain window eviction (the paper's "window attention" baseline).

`streaming_perplexity` feeds a text one token at a time through such a cache and returns the
perplexity of every next-token prediction: the paper's Fig. 3 experiment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError
from slimlm.infer.cache import CacheShape, ContiguousCache


def check_sink_window(sink: int, window: int) -> None:
    if sink < 0:
        raise SlimlmError(f"sink tokens must be >= 0, got {sink}")
    if window < 1:
        raise SlimlmError(f"window must be at least 1 token, got {window}")


class SinkWindowCache(ContiguousCache):
    """A contiguous cache of `sink + window` slots per sequence that evicts the middle (StreamingLLM)."""

    rotate_on_read = True

    def __init__(self, shape: CacheShape, batch: int, sink: int = 4, window: int = 256):
        check_sink_window(sink, window)
        super().__init__(shape, batch, sink + window)
        self.sink, self.window = sink, window
        self.evicted = [0] * batch  # tokens dropped per sequence so far
        self.max_step = window

    def reserve(self, counts: list[int]) -> list[int]:
        if max(counts, default=0) > self.window:
            raise SlimlmError(f"a step of {max(counts)} tokens does not fit a window of {self.window}: "
                              "feed it in chunks")
        for sequence, count in enumerate(counts):
            if self.lengths[sequence] + count > self.capacity:
                self._evict(sequence, keep_recent=self.capacity - count - self.sink)
        return super().reserve(counts)

    def _evict(self, sequence: int, keep_recent: int) -> None:
        """Keep the sinks and the `keep_recent` newest tokens, moved down to follow the sinks."""
        length = self.lengths[sequence]
        source = slice(length - keep_recent, length)
        target = slice(self.sink, self.sink + keep_recent)
        for keys, values in zip(self.keys, self.values):
            keys[sequence, :, target] = keys[sequence, :, source].clone()
            values[sequence, :, target] = values[sequence, :, source].clone()
        self.evicted[sequence] += length - self.sink - keep_recent
        self.lengths[sequence] = self.sink + keep_recent


@torch.no_grad()
def streaming_perplexity(runner, token_ids: list[int], sink: int, window: int) -> tuple[float, list[float]]:
    """Perplexity of `token_ids` fed one token at a time through a sink + window cache; also the
    per-token negative log-likelihoods (index i: NLL of token i + 1)."""
    check_sink_window(sink, window)
    if len(token_ids) < 2:
        raise SlimlmError("streaming perplexity needs at least 2 tokens")
    cache = SinkWindowCache(runner.cache_shape(), 1, sink, window)
    ids = torch.tensor(token_ids, dtype=torch.long)
    losses = []
    for position in range(len(token_ids) - 1):
        logits = runner.forward(ids[position:position + 1][None], [1], cache)
        target = ids[position + 1:position + 2].to(logits.device)
        losses.append(F.cross_entropy(logits.float(), target).item())
    return math.exp(sum(losses) / len(losses)), losses
