"""Checks shared by the structural-pruning tests."""

import torch
from transformers import AutoModelForCausalLM


def assert_plain_transformers_roundtrip(model, directory, probe: torch.Tensor) -> None:
    """`save_pretrained` then plain `from_pretrained` gives the same logits, and cached greedy decoding
    agrees with recomputing the whole sequence (each attention's `layer_idx` and head counts are right)."""
    model.save_pretrained(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, model(probe).logits)
        cached = reloaded.generate(probe[:1], max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = reloaded.generate(probe[:1], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
