"""LoRA: an identity at initialisation, exact merge, and training lowers the loss."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.finetune.lora import LoRALinear, add_lora, merge_lora_, train_lora
from slimlm.models.tiny import tiny_model

SEGMENTS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("family", "per_block"), [("llama", 7), ("gpt2", 4), ("opt", 6)])
def test_lora_starts_as_the_model_and_merges_exactly(family, per_block):
    model, reference = tiny_model(family), tiny_model(family)
    assert add_lora(model, rank=4) == 2 * per_block
    with torch.no_grad():
        assert torch.equal(model(SEGMENTS).logits, reference(SEGMENTS).logits)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()
        adapted = model(SEGMENTS).logits
    assert merge_lora_(model) > 0
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(SEGMENTS).logits, adapted, atol=1e-4)


def test_training_updates_only_lora_and_lowers_the_loss():
    model = tiny_model("llama")
    frozen = {name: p.clone() for name, p in model.named_parameters()}
    add_lora(model, rank=4, dropout=0.0)
    report = train_lora(model, SEGMENTS, steps=30, batch_size=8, lr=5e-3)
    assert report.tokens == 30 * 8 * 32 and report.last_loss < report.first_loss
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base.", ".")]), name


def test_training_without_lora_is_a_clear_error():
    model = tiny_model("llama")
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(SlimlmError, match="add_lora"):
        train_lora(model, SEGMENTS, steps=1)
