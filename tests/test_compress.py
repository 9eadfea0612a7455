import json
from contextlib import contextmanager

import pytest
import torch
import yaml

from slimlm.cli import main
from slimlm.compress import compress, load_recipe
from slimlm.compress.presets import PRESETS
from slimlm.core.blocks import capture_block_inputs
from slimlm.core.hessian import HessianAccumulator, SharedHessians
from slimlm.core.sequential import BlockBranches, ResidualMlp
from slimlm.errors import SlimlmError
from slimlm.export.native import load, save
from slimlm.models.adapter import ModelAdapter
from slimlm.models.loading import load_model
from slimlm.models.tiny import TINY_FAMILIES, tiny_model
from slimlm.quant.qlinear import QuantizedLinear

CALIBRATION = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


# Fused projections: GPT-2 and GPT-NeoX/Falcon qkv (and a two-matrix MLP), Phi-3 qkv and gate_up.
LINEARS_PER_BLOCK = {"gpt2": 4, "gpt_neox": 4, "falcon": 4, "phi3": 4, "opt": 6, "phi": 6}


def recipe(method, **settings):
    return {"stages": [{"method": method, "bits": 4, "group_size": 32, **settings}], "calibration": {"batch_size": 4}}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_method_runs_on_every_family(family, method):
    model, reference = tiny_model(family), tiny_model(family)
    if method == "awq" and family == "phi":  # one norm feeds attention and MLP: refused before any work
        with pytest.raises(SlimlmError, match="AWQ folds scales .* block 0 has norms \\['attn_norm'\\]"):
            compress(model, recipe(method), calibration=CALIBRATION)
        return
    report = compress(model, recipe(method), calibration=CALIBRATION)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(report.layers) == 2 * LINEARS_PER_BLOCK.get(family, 7)
    with torch.no_grad():
        error = (model(PROBE).logits - reference(PROBE).logits).abs().mean()
        scale = reference(PROBE).logits.abs().mean()
    assert 0 < error < 0.5 * scale


def test_awq_keeps_the_float_function_before_rounding():
    """The scales AWQ folds into norms and linears are an exact rewrite at 8 bits (tiny rounding only)."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    compress(model, recipe("awq", bits=8, clip_search=False), calibration=CALIBRATION)
    with torch.no_grad():
        assert torch.allclose(model(PROBE).logits, reference(PROBE).logits, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_awq_float16_search_matches_the_float32_search(family):
    errors = {}
    reference = tiny_model(family)
    for dtype in ("float32", "float16"):
        model = tiny_model(family)
        compress(model, recipe("awq", bits=3, search_dtype=dtype), calibration=CALIBRATION)
        with torch.no_grad():
            errors[dtype] = float((model(PROBE).logits - reference(PROBE).logits).pow(2).mean())
    assert errors["float16"] == pytest.approx(errors["float32"], rel=0.05)


def test_awq_falls_back_to_float32_where_float16_overflows():
    results = []
    for dtype in ("float32", "float16"):
        model = tiny_model("llama")
        with torch.no_grad():  # MLP outputs beyond float16's range (65504); the model stays finite in float32
            model.model.layers[0].mlp.down_proj.weight.mul_(1e6)
        compress(model, recipe("awq", bits=4, search_dtype=dtype), calibration=CALIBRATION)
        results.append(model.model.layers[0].mlp.down_proj.scale.clone())
    assert torch.equal(results[0], results[1])


def test_awq_auto_search_dtype_follows_the_hardware(monkeypatch):
    """float16 where the device multiplies it natively, float32 where PyTorch emulates it; the report says which."""
    from slimlm.quant import awq, cpu_kernels

    monkeypatch.setattr(cpu_kernels, "cpu_flags_line", lambda: "flags : fpu avx2 avx512f avx512_bf16")
    assert awq.resolve_search_dtype("auto", torch.device("cpu")) == "float32"
    assert awq.resolve_search_dtype("auto", torch.device("cuda")) == "float16"
    assert awq.resolve_search_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    monkeypatch.setattr(cpu_kernels, "cpu_flags_line", lambda: "flags : fpu avx512f avx512_fp16 amx_bf16")
    assert awq.resolve_search_dtype("auto", torch.device("cpu")) == "float16"
    report = compress(tiny_model("llama"), recipe("awq", bits=4), calibration=CALIBRATION)
    assert report.notes == {"awq_search_dtype": "float16"} and report.to_dict()["notes"] == report.notes


def test_gptq_beats_rtn_on_a_tiny_model_output():
    reference = tiny_model("llama")
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model("llama")
        compress(model, recipe(method, bits=3, group_size="channel"), calibration=CALIBRATION)
        with torch.no_grad():
            errors[method] = (model(CALIBRATION).logits - reference(CALIBRATION).logits).pow(2).mean()
    assert errors["gptq"] < errors["rtn"]


def test_hessian_is_the_running_average_of_2_x_xt():
    acc = HessianAccumulator(4)
    x1, x2 = torch.randn(3, 5, 4), torch.randn(2, 5, 4)
    acc.add_batch(x1)
    acc.add_batch(x2)
    X = torch.cat([x1.reshape(-1, 4), x2.reshape(-1, 4)])
    assert torch.allclose(acc.result(), 2 * X.T @ X / X.shape[0], atol=1e-5)
    nan = HessianAccumulator(2)
    nan.add_batch(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(SlimlmError, match="NaN"):
        nan.result()


def test_linears_fed_one_tensor_share_one_hessian():
    shared, x, y = SharedHessians(), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    for batch in (x, y):
        for name in ("q", "k"):
            shared.add(name, batch)
        shared.add("o", batch.clone())  # equal values, another tensor: its own accumulator
    alone = HessianAccumulator(4)
    alone.add_batch(x)
    alone.add_batch(y)
    assert shared._by_name["q"] is shared._by_name["k"] is not shared._by_name["o"]
    for name in ("q", "k", "o"):
        assert torch.allclose(shared.pop(name), alone.result(), atol=1e-6)


PARALLEL_BLOCKS = ("gpt_neox", "falcon")  # attention and MLP both read the block's input: no MLP half to run alone


def first_block_inputs(model):
    adapter = ModelAdapter(model)
    return adapter, capture_block_inputs(model, adapter, CALIBRATION, 4, torch.device("cpu"))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_branch_shortcuts_are_used_only_where_they_reproduce_the_block(family):
    model = tiny_model(family)
    adapter, inputs = first_block_inputs(model)
    branches = BlockBranches.of(adapter[0])
    checks = branches.check(adapter[0].module, inputs)
    if family in ("opt", "phi"):  # OPT's fc1/fc2 sit in the block itself; Phi's MLP reads the attention's norm
        assert branches.mlp is None and checks == (False, False, False)
    elif family in PARALLEL_BLOCKS:
        assert checks == (False, False, False)
    else:
        assert checks == (True, True, True)
    # A check that cannot fail is no check: the same parts wired wrongly (the attention's norm in front of the
    # MLP, a norm after o that the block does not have) fail it.
    if checks[0]:
        norm = adapter[0].norms["attn_norm"]
        wrong = BlockBranches(branches.o, norm, ResidualMlp(branches.mlp.mlp, norm, branches.mlp.out_norm),
                              branches.down, branches.mlp_out_norm)
        assert wrong.check(adapter[0].module, inputs) == (False, False, False)


@contextmanager
def linear_calls(model):
    """Count the finished forward calls of the model's linears by name, the compressed replacements included."""
    counts, names = {}, {}
    linear_names = set(ModelAdapter(model).linear_layers())

    def hook(module, _args, _output):
        if module not in names:  # a replacement module: look the names up again
            names.clear()
            names.update({m: n for n, m in model.named_modules()})
        name = names.get(module)
        if name in linear_names:
            counts[name] = counts.get(name, 0) + 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "qwen2"])
def test_gptq_with_the_branch_shortcuts_equals_full_block_passes_and_runs_each_linear_once(family, monkeypatch):
    shortcut = tiny_model(family)
    with linear_calls(shortcut) as counts:
        compress(shortcut, load_recipe(recipe("gptq")), calibration=CALIBRATION)
    batches = len(CALIBRATION) // 4
    # Each linear of block 1 runs once per batch (block 0 also runs for the capture and the branch check); on
    # the first batch, q and k (gate) run before v (up) takes the input they share, as the collection learns so.
    last = [n for name, n in counts.items() if name.startswith(f"{ModelAdapter(shortcut).blocks_name}.1.")]
    assert len(last) == LINEARS_PER_BLOCK.get(family, 7) and set(last) <= {batches, batches + 1}
    monkeypatch.setattr(BlockBranches, "check", lambda *a: (False, False, False))
    full = tiny_model(family)
    with linear_calls(full) as counts:
        compress(full, load_recipe(recipe("gptq")), calibration=CALIBRATION)
    assert max(counts.values()) >= 2 * batches  # without the shortcuts some linears run twice
    for (name, a), b in zip(shortcut.named_buffers(), full.buffers()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(shortcut(PROBE).logits, full(PROBE).logits)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stages": [{"method": "gptq", "bitz": 4}]}, "unknown key 'bitz'; valid keys: .*bits"),
        ({"stages": [{"method": "gptq", "bits": 0}]}, "bits must be between 2 and 8"),
        ({"stages": [{"method": "gptq", "bits": 9}]}, "bits must be between 2 and 8"),
        ({"stages": [{"method": "zip"}]}, "unknown method 'zip'"),
        ({"stages": []}, "stages"),
        ({"stages": [{"method": "awq", "group_size": "tensor"}]}, "AWQ scales per group"),
        ({"stages": [{"method": "rtn"}], "calibration": {"samples": 0}}, "calibration.samples"),
    ],
)
def test_invalid_recipes_are_rejected_with_a_clear_message(data, message):
    with pytest.raises(SlimlmError, match=message):
        load_recipe(data)


def test_recipe_checks_against_the_model_happen_before_any_work():
    model = tiny_model("llama")  # hidden 64, MLP 128
    with pytest.raises(SlimlmError, match="does not divide"):
        compress(model, recipe("rtn", group_size=48, partial_last_group=False))
    with pytest.raises(SlimlmError, match="select no linear layer"):
        compress(model, recipe("rtn", targets=["*nothing*"]))
    with pytest.raises(SlimlmError, match="needs calibration"):
        compress(model, recipe("gptq"))
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_partial_last_group_is_the_default():
    model = tiny_model("llama")
    compress(model, recipe("rtn", group_size=48))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantizedLinear) and q.scale.shape[1] == 2  # 48 + 16 columns


def test_yaml_and_presets_round_trip(tmp_path):
    preset = load_recipe("gptq-w4g64-actorder")
    assert preset.stages[0].act_order and preset.stages[0].group_size == 64
    path = tmp_path / "recipe.yaml"
    path.write_text(preset.to_yaml())
    assert load_recipe(path) == preset
    assert {"rtn-w4g64", "gptq-w4g64", "gptq-w3g64", "awq-w4g64", "rtn-w4g128", "gptq-w4g128", "gptq-w3g128",
            "awq-w4g128"} <= set(PRESETS)
    path.write_text(yaml.safe_dump({"stages": [{"method": "gptq", "group": 64}]}))
    with pytest.raises(SlimlmError, match="unknown key 'group'"):
        load_recipe(path)
    with pytest.raises(SlimlmError, match="unknown recipe"):
        load_recipe("gptq-w5g7")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_saved_model_reloads_bitwise_identical(family, tmp_path, tokenizer):
    model = tiny_model(family, vocab_size=len(tokenizer))
    calibration = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    compress(model, recipe("gptq", act_order=True), calibration=calibration)
    save(model, tmp_path / "q", tokenizer)
    reloaded, reloaded_tokenizer = load(tmp_path / "q")
    probe = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        assert torch.equal(model(probe).logits, reloaded(probe).logits)
    assert reloaded_tokenizer is not None
    assert torch.equal(load_model(tmp_path / "q").model(probe).logits, reloaded(probe).logits)
    with pytest.raises(SlimlmError, match="not empty"):
        save(model, tmp_path / "q", tokenizer)


def test_cli_compress_with_eval_before_and_after(tmp_path, tokenizer, capsys):
    source = tmp_path / "float"
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out, record = tmp_path / "w4", tmp_path / "record.json"
    code = main(["compress", "--model", str(source), "--recipe", "gptq-w4g32", "--out", str(out),
                 "--calib-corpus", "pydoc", "--calib-samples", "4", "--calib-seqlen", "32",
                 "--eval", "pydoc", "--kl", "--seqlen", "64", "--max-windows", "2", "--json", str(record)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| pydoc | ppl |" in printed and "| pydoc | kl_mean |" in printed and "compression_seconds" in printed
    data = json.loads(record.read_text())
    assert data["metrics"]["sizes"]["disk_bytes_after"] < data["metrics"]["sizes"]["disk_bytes_before"]
    assert data["protocol"]["recipe"]["calibration"]["samples"] == 4
    assert (out / "slimlm.json").is_file()
    assert main(["eval", "--model", str(out), "--tasks", "pydoc", "--seqlen", "64", "--max-windows", "2"]) == 0


def test_cli_compress_rejects_a_bad_recipe_before_loading(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - method: gptq\n    bits: 1\n")
    assert main(["compress", "--model", "nowhere", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bits must be between 2 and 8" in capsys.readouterr().err


def test_float_storage_rounds_in_memory_and_halves_the_float_part_on_disk(tmp_path):
    from slimlm.eval.efficiency import disk_bytes

    plain, rounded = tiny_model("llama"), tiny_model("llama")
    compress(plain, {**recipe("rtn"), "float_storage": "float32"})
    compress(rounded, {**recipe("rtn"), "float_storage": "bfloat16"})
    embedding = rounded.model.embed_tokens.weight
    assert embedding.dtype == torch.float32 and torch.equal(embedding, embedding.bfloat16().float())
    assert disk_bytes(rounded) < 0.75 * disk_bytes(plain)
    save(rounded, tmp_path / "q")
    reloaded, _ = load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(rounded(PROBE).logits, reloaded(PROBE).logits)


def test_float_storage_auto_keeps_a_16_bit_source_and_rounds_float32_to_bfloat16(tmp_path, tokenizer):
    saved = tiny_model("llama", vocab_size=len(tokenizer)).to(torch.float16)
    saved.save_pretrained(tmp_path / "fp16")
    tokenizer.save_pretrained(tmp_path / "fp16")
    loaded = load_model(str(tmp_path / "fp16")).model  # loaded as float32: the checkpoint's dtype is remembered
    assert next(loaded.parameters()).dtype == torch.float32
    assert compress(loaded, recipe("rtn")).float_storage == "float16"
    float32_source = tiny_model("llama")
    assert compress(float32_source, recipe("rtn")).float_storage == "bfloat16"
    embedding = float32_source.model.embed_tokens.weight
    assert torch.equal(embedding, embedding.bfloat16().float())
    kept = tiny_model("llama")
    original = kept.model.embed_tokens.weight.clone()
    assert compress(kept, {**recipe("rtn"), "float_storage": "float32"}).float_storage == "float32"
    assert torch.equal(kept.model.embed_tokens.weight, original)


def test_adapter_metrics_and_cli_work_on_a_quantized_model(tmp_path, tokenizer, capsys):
    from slimlm.eval.efficiency import count_parameters, flops_per_token
    from slimlm.models.adapter import ModelAdapter

    model, reference = tiny_model("llama", vocab_size=len(tokenizer)), tiny_model("llama", vocab_size=len(tokenizer))
    compress(model, recipe("rtn"))
    assert len(ModelAdapter(model).linear_layers()) == 14
    assert count_parameters(model) == count_parameters(reference)  # logical parameters
    assert flops_per_token(model, 64) == flops_per_token(reference, 64)
    with pytest.raises(SlimlmError, match="already compressed"):
        compress(model, recipe("rtn"))
    save(model, tmp_path / "q", tokenizer)
    assert main(["info", "--model", str(tmp_path / "q")]) == 0
    assert "| parameters |" in capsys.readouterr().out


def test_top_level_python_api():
    import slimlm
    import slimlm.compress.engine  # importing a submodule must not rebind the function

    model = tiny_model("llama")
    report = slimlm.compress(model, "rtn-w4g32")
    assert callable(slimlm.compress) and len(report.layers) == 14
    assert callable(slimlm.save) and callable(slimlm.load)


def test_gptq_without_room_for_the_down_inputs_runs_the_mlp_half_instead(monkeypatch):
    from slimlm.core import sequential

    kept = tiny_model("llama")
    compress(kept, load_recipe(recipe("gptq")), calibration=CALIBRATION)
    monkeypatch.setattr(sequential, "available_memory", lambda device: 1024)  # no room: d is not kept
    tight = tiny_model("llama")
    with linear_calls(tight) as counts:
        compress(tight, load_recipe(recipe("gptq")), calibration=CALIBRATION)
    assert counts["model.layers.1.mlp.gate_proj"] == 2 * (len(CALIBRATION) // 4) + 1  # the half runs once more
    for a, b in zip(kept.buffers(), tight.buffers()):
        assert torch.equal(a, b)
