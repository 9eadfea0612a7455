"""Attention sinks + sliding window (StreamingLLM): what the cache keeps and the positions it assigns."""

import math

import pytest
import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError
from slimlm.infer import CacheSettings, ModelRunner, SinkWindowCache, generate_ids, streaming_perplexity
from slimlm.models.tiny import tiny_model

TOKENS = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(4)).tolist()


pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(runner: ModelRunner, cache: SinkWindowCache, tokens: list[int]) -> list[torch.Tensor]:
    return [runner.forward(torch.tensor([[t]]), [1], cache)[0] for t in tokens]


@pytest.mark.parametrize("sink, window", [(2, 6), (0, 8), (4, 1)])
def test_cache_keeps_sinks_and_window_at_cache_positions(sink, window):
    """With one decoder block, cached keys/values depend only on their own token, so the streamed logits
    must equal a fresh forward over exactly [first `sink` tokens] + [last `window` tokens] at positions
    0, 1, 2, ... (positions within the cache, not in the text)."""
    model = tiny_model("llama", seed=2, blocks=1)
    runner = ModelRunner(model)
    cache = SinkWindowCache(runner.cache_shape(), 1, sink, window)
    streamed = _stream(runner, cache, TOKENS)
    with torch.no_grad():
        for i, logits in enumerate(streamed):
            kept = TOKENS[: i + 1] if i < sink + window else TOKENS[:sink] + TOKENS[i + 1 - window: i + 1]
            expected = model(torch.tensor([kept])).logits[0, -1]
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [sink + window]
    assert cache.evicted == [len(TOKENS) - sink - window]


def test_before_eviction_the_sink_cache_is_an_ordinary_cache():
    model = tiny_model("qwen2", seed=1)
    runner = ModelRunner(model)
    streamed = _stream(runner, SinkWindowCache(runner.cache_shape(), 1, 4, 28), TOKENS[:32])
    with torch.no_grad():
        full = model(torch.tensor([TOKENS[:32]])).logits[0]
    torch.testing.assert_close(torch.stack(streamed), full, atol=1e-5, rtol=1e-5)
    # perplexity through a cache that never evicts equals the full-context perplexity
    ppl, losses = streaming_perplexity(runner, TOKENS[:32], sink=4, window=28)
    reference = F.cross_entropy(full[:-1], torch.tensor(TOKENS[1:32])).item()
    assert len(losses) == 31 and ppl == pytest.approx(math.exp(reference), rel=1e-4)


def test_generation_runs_past_the_cache_size_and_chunks_long_prompts():
    model = tiny_model("llama")
    settings = CacheSettings("sinks", sink_tokens=2, window=8)
    prompt = TOKENS[:5]
    contiguous = generate_ids(model, [prompt], 30).tokens[0]
    streamed = generate_ids(model, [prompt], 30, cache=settings)
    assert len(streamed.tokens[0]) == 30
    assert streamed.tokens[0][:5] == contiguous[:5]  # identical until the cache first evicts (10 tokens)
    assert streamed.stats.kv_bytes_held == 10 * streamed.stats.kv_bytes_per_token
    long_prompt = generate_ids(model, [TOKENS, TOKENS[:3]], 4, cache=settings)  # 40 tokens > window: chunked
    assert [len(t) for t in long_prompt.tokens] == [4, 4]
    with pytest.raises(SlimlmError, match="feed it in chunks"):
        runner = ModelRunner(model)
        runner.forward(torch.tensor([TOKENS[:9]]), [9], SinkWindowCache(runner.cache_shape(), 1, 2, 8))
