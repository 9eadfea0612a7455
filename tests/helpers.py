"""Checks shared by several test modules (structural pruning round trips, quantized KV cache filling, a small
byte-level tokenizer for exporters)."""

import torch
from transformers import AutoModelForCausalLM

from slimlm.models.tiny import tiny_tokenizer


def assert_plain_transformers_roundtrip(model, directory, probe: torch.Tensor) -> None:
    """`save_pretrained` then plain `from_pretrained` gives the same logits, and cached greedy decoding
    agrees with recomputing the whole sequence (each attention's `layer_idx` and head counts are right)."""
    model.save_pretrained(directory)
    _assert_same_model(AutoModelForCausalLM.from_pretrained(directory).eval(), model, probe)


def assert_slimlm_roundtrip(model, directory, probe: torch.Tensor) -> None:
    """The same for a slimlm checkpoint (`slimlm.save` / `slimlm.load`): structure transformers configs
    cannot express (per-block widths, residual shortcuts) comes back from slimlm.json."""
    from slimlm.export.native import load, save

    save(model, directory)
    _assert_same_model(load(directory)[0], model, probe)


def _assert_same_model(reloaded, model, probe: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, model(probe).logits)
        cached = reloaded.generate(probe[:1], max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = reloaded.generate(probe[:1], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def fill_kv_cache(cache, tokens: int, step: int = 256, heads: int = 2, head_dim: int = 64, layers: int = 2) -> None:
    """Write `tokens` random float16 keys and values into every layer of a one-sequence cache, `step` at a time."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(0, tokens, step):
        cache.reserve([step])
        for layer in range(layers):
            cache.write(layer, torch.randn(1, heads, step, head_dim, generator=generator).half(),
                        torch.randn(1, heads, step, head_dim, generator=generator).half())


def small_bpe_tokenizer(adds_bos: bool = False):
    """`slimlm.models.tiny.tiny_tokenizer` (262 tokens; the real one's 49152 make every exported file slow to read)."""
    return tiny_tokenizer(adds_bos)
