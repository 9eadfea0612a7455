"""Efficient generation: slimlm's own decoder runner, KV caches (contiguous, paged, attention sinks),
sampling, streaming, speculative decoding and quantized KV caches (naive, KIVI, KVQuant). See docs/generation.md.

    from slimlm.infer import generate, SamplingSettings, CacheSettings
    result = generate(lm.model, lm.tokenizer, ["Hello", "Once upon a time"], max_new_tokens=32,
                      sampling=SamplingSettings(temperature=0.7, top_p=0.9, seed=1),
                      cache=CacheSettings("paged"))
"""

from slimlm.infer.cache import CacheShape, ContiguousCache, PagedCache
from slimlm.infer.draft import LeanRunner, build_draft
from slimlm.infer.engine import (
                                 CACHE_KINDS,
                                 CacheSettings,
                                 GenerationResult,
                                 GenerationStats,
                                 TokenEvent,
                                 generate,
                                 generate_ids,
                                 stream_ids,
                                 stream_text,
)
from slimlm.infer.kivi import KiviCache
from slimlm.infer.kvquant import KVQuantCache, calibrate_from_corpus, calibrate_kvquant
from slimlm.infer.quantized_cache import KVQuantSpec, NaiveQuantCache, chunked_kl, chunked_perplexity, parse_kv_cache
from slimlm.infer.runner import SUPPORTED_FAMILIES, ModelRunner
from slimlm.infer.sampling import SamplingSettings, next_token_probs
from slimlm.infer.speculative import (
                                      SpeculativeCosts,
                                      SpeculativeStats,
                                      choose_gamma,
                                      expected_speedup,
                                      speculative_decode,
                                      speculative_generate,
)
from slimlm.infer.streaming import SinkWindowCache, streaming_perplexity

__all__ = ["CACHE_KINDS", "CacheSettings", "CacheShape", "ContiguousCache", "GenerationResult", "GenerationStats",
           "KVQuantCache", "KVQuantSpec", "KiviCache", "LeanRunner", "ModelRunner", "NaiveQuantCache",
           "PagedCache", "SUPPORTED_FAMILIES", "SamplingSettings", "SinkWindowCache", "SpeculativeCosts",
           "SpeculativeStats", "TokenEvent", "build_draft", "calibrate_from_corpus", "calibrate_kvquant",
           "choose_gamma", "chunked_kl", "chunked_perplexity", "expected_speedup", "generate", "generate_ids",
           "next_token_probs", "parse_kv_cache", "speculative_decode", "speculative_generate", "stream_ids",
           "stream_text", "streaming_perplexity"]
