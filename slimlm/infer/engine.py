"""Generation: greedy and sampled decoding of a batch of prompts, streamed token by token.

`stream_ids` is the core loop over token ids; `generate_ids` collects it; `generate` and
`stream_text` add the tokenizer (prompts as text, text deltas as tokens arrive).

A batch of prompts with different lengths is prefilled in one forward pass (right-padded, a token
count per row; see `slimlm.infer.runner`), then every step feeds each unfinished sequence its
last token. A sequence finishes at `max_new_tokens` or at an end-of-sequence token; a paged cache
gets its blocks back then. Each prompt's output is the same as generating it alone (greedy: same
tokens; sampling draws from one generator for the whole batch, so the random stream differs).

Caches: `contiguous` (preallocated to the longest prompt + max_new_tokens), `paged`
(PagedAttention blocks, `block_size` tokens) and `sinks` (StreamingLLM: `sink_tokens` +
`window`, unbounded length); `CacheSettings(kv_quant="kivi-2bit")` replaces the contiguous cache
by a quantized one (`slimlm.infer.quantized_cache`, `slimlm.infer.kivi`, `slimlm.infer.kvquant`; KVQuant
needs `kv_calibration`, from `slimlm.infer.kvquant.calibrate_kvquant`). Timings: time to first token =
prefill + first sample; per-token latency = decode time / decode steps (a step gives one token to
every running sequence); tokens/s = generated tokens / total time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimlm.errors import SlimlmError
from slimlm.infer.cache import ContiguousCache, KVCache, PagedCache
from slimlm.infer.runner import ModelRunner
from slimlm.infer.sampling import SamplingSettings, choose, next_token_probs
from slimlm.infer.streaming import SinkWindowCache, check_sink_window

CACHE_KINDS = ("contiguous", "paged", "sinks")


@dataclass(frozen=True)
class CacheSettings:
    kind: str = "contiguous"
    block_size: int = 16  # paged
    sink_tokens: int = 4  # sinks
    window: int = 256  # sinks
    kv_quant: str | None = None  # contiguous only: "naive-4bit", "kivi-2bit", ... (slimlm.infer.quantized_cache)
    kv_group_size: int = 32  # quantized: channels (per token) or tokens (KIVI keys) per scale
    kv_residual: int = 128  # KIVI: recent tokens kept in full precision
    kv_outliers: float = 0.01  # KVQuant: fraction of values kept sparse in float16
    kv_calibration: Any = field(default=None, compare=False, repr=False)  # KVQuant: KVQuantCalibration

    def __post_init__(self) -> None:
        if self.kind not in CACHE_KINDS:
            raise SlimlmError(f"unknown cache {self.kind!r}: choose one of {', '.join(CACHE_KINDS)}")
        if self.block_size < 1:
            raise SlimlmError(f"block size must be at least 1, got {self.block_size}")
        check_sink_window(self.sink_tokens, self.window)
        if self.kv_quant is not None:
            if self.kind != "contiguous":
                raise SlimlmError(f"a quantized KV cache ({self.kv_quant}) replaces the contiguous cache; "
                                  f"it cannot be combined with the {self.kind} cache")
            self.kv_spec()

    def kv_spec(self):
        """The checked quantization spec, or None for a float cache."""
        from slimlm.infer.quantized_cache import parse_kv_cache

        if self.kv_quant is None:
            return None
        return parse_kv_cache(self.kv_quant, self.kv_group_size, self.kv_residual, self.kv_outliers,
                              self.kv_calibration)

    @property
    def label(self) -> str:
        return self.kv_quant or self.kind


@dataclass
class GenerationStats:
    prompt_tokens: list[int]
    new_tokens: list[int]
    cache: str
    time_to_first_token_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    total_s: float = 0.0
    kv_bytes_held: int = 0  # at the step where the cache held the most
    kv_bytes_wasted: int = 0  # at that same step
    kv_bytes_per_token: int = 0  # keys + values of one token, all layers

    @property
    def per_token_s(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.total_s if self.total_s else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "per_token_s": self.per_token_s, "tokens_per_s": self.tokens_per_s}


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (prompt excluded)
    stats: GenerationStats
    texts: list[str] | None = None


@dataclass(frozen=True)
class TokenEvent:
    sequence: int  # index of the prompt in the batch
    token: int
    step: int  # 0 for the first generated token


@dataclass
class _Snapshot:
    held: int = 0
    wasted: int = 0
    used: int = -1

    def update(self, cache: KVCache) -> None:
        held, used = cache.bytes_held(), sum(cache.lengths)
        if (held, used) >= (self.held, self.used):
            self.held, self.wasted, self.used = held, cache.bytes_wasted(), used


def as_runner(model: PreTrainedModel | ModelRunner) -> ModelRunner:
    """A model gets slimlm's runner; a runner (`ModelRunner`, `slimlm.infer.draft.LeanRunner`) is used as it is."""
    return ModelRunner(model) if isinstance(model, torch.nn.Module) else model


def validate_request(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SlimlmError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise SlimlmError("no prompts given")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise SlimlmError(f"prompt {index} is empty: give at least one token of text")


def make_cache(runner: ModelRunner, settings: CacheSettings, max_lengths: list[int]) -> KVCache:
    shape = runner.cache_shape()
    if settings.kv_quant is not None:
        from slimlm.infer.quantized_cache import make_quantized_cache

        return make_quantized_cache(shape, len(max_lengths), settings.kv_spec())
    if settings.kind == "paged":
        return PagedCache.for_lengths(shape, max_lengths, settings.block_size)
    if settings.kind == "sinks":
        return SinkWindowCache(shape, len(max_lengths), settings.sink_tokens, settings.window)
    return ContiguousCache(shape, len(max_lengths), max(max_lengths))


def prefill(runner: ModelRunner, cache: KVCache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Feed every prompt; returns the logits after each prompt's last token, [batch, vocab]. A cache with
    a step limit (sinks) is fed in chunks of at most that many tokens per sequence."""
    chunk = getattr(cache, "max_step", None) or max(len(p) for p in prompts)
    fed = [0] * len(prompts)
    last_logits: list[torch.Tensor | None] = [None] * len(prompts)
    while any(n < len(p) for n, p in zip(fed, prompts)):
        pieces = [list(p[n:n + chunk]) for n, p in zip(fed, prompts)]
        counts = [len(piece) for piece in pieces]
        width = max(counts)
        tokens = torch.tensor([piece + [0] * (width - len(piece)) for piece in pieces], dtype=torch.long)
        logits = runner.forward(tokens, counts, cache)
        for b, count in enumerate(counts):
            fed[b] += count
            if count and fed[b] == len(prompts[b]):
                last_logits[b] = logits[b]
    return torch.stack(last_logits)


@torch.no_grad()
def stream_ids(model: PreTrainedModel | ModelRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: SamplingSettings = SamplingSettings(), cache: CacheSettings = CacheSettings(),
               eos_token_ids: Sequence[int] = (), stats: GenerationStats | None = None) -> Iterator[TokenEvent]:
    """Yield each generated token as soon as it is chosen. Pass a `GenerationStats` to have it filled in."""
    validate_request(prompts, max_new_tokens)
    runner = as_runner(model)
    lengths = [len(p) for p in prompts]
    stats = stats if stats is not None else GenerationStats(lengths, [0] * len(prompts), cache.label)
    stats.prompt_tokens, stats.new_tokens, stats.cache = lengths, [0] * len(prompts), cache.label
    if max_new_tokens == 0:
        return
    start = time.perf_counter()
    kv = make_cache(runner, cache, [n + max_new_tokens for n in lengths])
    stats.kv_bytes_per_token = getattr(kv, "token_bytes", runner.cache_shape().token_bytes)()
    generator, snapshot, stop = sampling.generator(runner.device), _Snapshot(), set(eos_token_ids)
    logits = prefill(runner, kv, prompts)
    snapshot.update(kv)
    running = [True] * len(prompts)
    for step in range(max_new_tokens):
        tokens = choose(next_token_probs(logits, sampling), sampling, generator).tolist()
        if step == 0:
            stats.time_to_first_token_s = time.perf_counter() - start
        for b, token in enumerate(tokens):
            if running[b]:
                stats.new_tokens[b] += 1
                yield TokenEvent(b, token, step)
                if token in stop or stats.new_tokens[b] == max_new_tokens:
                    running[b] = False
                    kv.release(b)
        if not any(running):
            break
        step_start = time.perf_counter()
        counts = [int(r) for r in running]
        logits = runner.forward(torch.tensor(tokens, dtype=torch.long)[:, None], counts, kv)
        snapshot.update(kv)
        stats.decode_steps += 1
        stats.decode_s += time.perf_counter() - step_start
    stats.total_s = time.perf_counter() - start
    stats.kv_bytes_held, stats.kv_bytes_wasted = snapshot.held, snapshot.wasted


def generate_ids(model: PreTrainedModel | ModelRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingSettings = SamplingSettings(), cache: CacheSettings = CacheSettings(),
                 eos_token_ids: Sequence[int] = (),
                 on_token: Callable[[TokenEvent], None] | None = None) -> GenerationResult:
    """Generated token ids for each prompt (lists of ids), with timings and KV memory."""
    stats = GenerationStats([], [], cache.label)
    outputs: list[list[int]] = [[] for _ in prompts]
    for event in stream_ids(model, prompts, max_new_tokens, sampling, cache, eos_token_ids, stats):
        outputs[event.sequence].append(event.token)
        if on_token is not None:
            on_token(event)
    return GenerationResult(outputs, stats)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """End-of-sequence ids from the generation config (may be a list) and the tokenizer."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return sorted(ids)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str]) -> list[list[int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise SlimlmError(f"prompt {index} is empty: give at least one character of text")
    return [tokenizer(prompt)["input_ids"] for prompt in prompts]


class TextDeltas:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def rest(self) -> str:
        """What is still held back when generation ends (a character that never completed)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def stream_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str],
                max_new_tokens: int, sampling: SamplingSettings = SamplingSettings(),
                cache: CacheSettings = CacheSettings(), stop_at_eos: bool = True,
                stats: GenerationStats | None = None) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, text delta) as tokens arrive."""
    ids = encode_prompts(tokenizer, prompts)
    deltas = [TextDeltas(tokenizer) for _ in ids]
    stop = eos_ids(model, tokenizer) if stop_at_eos else []
    for event in stream_ids(model, ids, max_new_tokens, sampling, cache, stop, stats):
        piece = deltas[event.sequence].add(event.token)
        if piece:
            yield event.sequence, piece
    for index, delta in enumerate(deltas):
        piece = delta.rest()
        if piece:
            yield index, piece


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str],
             max_new_tokens: int = 64, sampling: SamplingSettings = SamplingSettings(),
             cache: CacheSettings = CacheSettings(), stop_at_eos: bool = True,
             on_text: Callable[[int, str], None] | None = None) -> GenerationResult:
    """Generate continuations of one prompt or a batch; `on_text(index, delta)` streams text as it comes."""
    ids = encode_prompts(tokenizer, prompts)
    stop = eos_ids(model, tokenizer) if stop_at_eos else []
    deltas = [TextDeltas(tokenizer) for _ in ids]

    def emit(event: TokenEvent) -> None:
        piece = deltas[event.sequence].add(event.token)
        if piece and on_text is not None:
            on_text(event.sequence, piece)

    result = generate_ids(model, ids, max_new_tokens, sampling, cache, stop, emit)
    for index, delta in enumerate(deltas):
        piece = delta.rest()
        if piece and on_text is not None:
            on_text(index, piece)
    result.texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in result.tokens]
    return result


def padded_waste_bytes(lengths: Sequence[int], token_bytes: int) -> int:
    """What padding every sequence to the longest would waste (the contiguous layout), for comparisons."""
    return (len(lengths) * max(lengths) - sum(lengths)) * token_bytes


__all__ = ["CACHE_KINDS", "CacheSettings", "GenerationResult", "GenerationStats", "TokenEvent", "generate",
           "generate_ids", "stream_ids", "stream_text", "padded_waste_bytes"]
