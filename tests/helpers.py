"""Checks shared by the structural-pruning tests."""

import torch
from transformers import AutoModelForCausalLM


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
