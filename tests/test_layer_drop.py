"""Layer removal: the shallower model is a plain transformers model; the criteria pick the right blocks."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.compress import compress, load_recipe
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter
from slimlm.models.loss import calibration_perplexity
from slimlm.models.tiny import TINY_FAMILIES, tiny_model
from slimlm.prune.layer_drop import remove_blocks_
from tests.helpers import assert_plain_transformers_roundtrip

CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def drop(model, **stage):
    recipe = load_recipe({"stages": [{"method": "drop_layers", **stage}], "calibration": {"batch_size": 2}})
    return compress(model, recipe, calibration=CALIBRATION)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dropped_model_saves_and_loads_with_plain_transformers(family, tmp_path):
    model = tiny_model(family, blocks=4)
    report = drop(model, count=2)
    assert len(ModelAdapter(model).blocks) == 2 == model.config.num_hidden_layers
    assert len(report.structure[0]["removed_blocks"]) == 2
    assert_plain_transformers_roundtrip(model, tmp_path, PROBE)


def test_angular_criterion_removes_the_blocks_that_change_the_residual_stream_least():
    model = tiny_model("llama", blocks=4)
    with torch.no_grad():  # block 2 becomes an identity: zero output projections
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    report = drop(model, count=1)
    assert report.structure[0]["removed_blocks"] == [2]
    assert report.structure[0]["importance"][2] == pytest.approx(0.0, abs=1e-6)


def test_perplexity_criterion_removes_the_block_whose_removal_costs_least():
    reference = tiny_model("qwen2", blocks=4)
    expected = []
    for index in range(4):
        copy = tiny_model("qwen2", blocks=4)
        remove_blocks_(copy, ModelAdapter(copy), [index])
        with torch.no_grad():
            expected.append(calibration_perplexity(copy, CALIBRATION, 2, torch.device("cpu")))
    report = drop(reference, count=1, criterion="perplexity")
    assert report.structure[0]["importance"] == pytest.approx(expected)
    assert report.structure[0]["removed_blocks"] == [min(range(4), key=expected.__getitem__)]


def test_layer_drop_composes_with_quantization_after_it():
    model = tiny_model("llama", blocks=4)
    recipe = {"stages": [{"method": "drop_layers", "ratio": 0.25}, {"method": "rtn", "bits": 4, "group_size": 32}]}
    compress(model, load_recipe(recipe), calibration=CALIBRATION)
    assert model.config.num_hidden_layers == 3
    assert all(getattr(m, "is_compressed_linear", False) for m in ModelAdapter(model).linear_layers().values())


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"stages": [{"method": "drop_layers"}]}, "exactly one of `count`"),
        ({"stages": [{"method": "drop_layers", "count": 2, "ratio": 0.5}]}, "exactly one of `count`"),
        ({"stages": [{"method": "rtn"}, {"method": "drop_layers", "count": 1}]}, "put it before"),
    ],
)
def test_bad_layer_drop_recipes_fail_with_a_clear_message(recipe, message):
    with pytest.raises(SlimlmError, match=message):
        load_recipe(recipe)


def test_removing_every_block_fails_before_any_work():
    model = tiny_model("llama", blocks=2)
    with pytest.raises(SlimlmError, match="cannot remove 2 of the model's 2 blocks"):
        drop(model, count=2)
    assert len(ModelAdapter(model).blocks) == 2


def test_cli_drops_layers_and_the_output_loads_with_plain_transformers(tmp_path, tokenizer, capsys):
    from slimlm.cli import main

    source = tmp_path / "deep"
    tiny_model("llama", vocab_size=len(tokenizer), blocks=4).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "shallow"
    assert main(["compress", "--model", str(source), "--recipe", "drop-layers-2", "--out", str(out),
                 "--calib-corpus", "pydoc", "--calib-samples", "2", "--calib-seqlen", "32"]) == 0
    assert '"removed_blocks"' in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
