"""Distillation: the divergences' math, the trainer (what trains, masks kept, resume after kill -9), the objectives
as recipe stages and from the command line, and bad input refused before training."""

import copy
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from slimlm.compress import compress
from slimlm.compress.recipe import load_recipe
from slimlm.distill.ce import CrossEntropy
from slimlm.distill.data import instruction_examples, token_segments
from slimlm.distill.gkd import GeneralizedKD
from slimlm.distill.hidden import HiddenStateDistillation, layer_map_after_removal, uniform_layer_map
from slimlm.distill.kd import KnowledgeDistillation
from slimlm.distill.losses import forward_kl, generalized_jsd, reverse_kl
from slimlm.distill.objective import check_same_vocabulary
from slimlm.distill.sampling import sample_continuations
from slimlm.distill.trainer import TrainingConfig, learning_rate_factor, train
from slimlm.errors import SlimlmError
from slimlm.eval.kl import token_kl
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.prune.layer_drop import uniform_importance

TOKENS = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
PEAKED = {"initializer_range": 0.1}  # random weights this large give peaked distributions, so truncation costs KL


def _logits(seed: int, shape=(3, 5, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _kl(student, teacher) -> float:
    with torch.no_grad():
        ids = TOKENS[:512].view(8, 64)
        return float(token_kl(teacher(ids).logits.flatten(0, 1), student(ids).logits.flatten(0, 1)).mean())


def test_divergences_match_their_definitions():
    s, t = _logits(0), _logits(1)
    expected_forward = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(forward_kl(s, t), expected_forward, atol=1e-6)
    assert torch.allclose(reverse_kl(s, t), forward_kl(t, s), atol=1e-6)
    assert torch.allclose(forward_kl(s, t, temperature=2.0), forward_kl(s / 2, t / 2), atol=1e-6)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(generalized_jsd(s, t, 0.5), jsd, atol=1e-6)
    # JSD(beta) / beta -> KL(P || Q) as beta -> 0; JSD(beta) / (1 - beta) -> KL(Q || P) as beta -> 1
    assert torch.allclose(generalized_jsd(s, t, 1e-7) / 1e-7, forward_kl(s, t), rtol=1e-3)
    assert torch.allclose(generalized_jsd(s, t, 1 - 1e-7) / 1e-7, reverse_kl(s, t), rtol=1e-3)
    assert torch.equal(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    for value in (forward_kl(s, s), reverse_kl(t, t), generalized_jsd(s, s, 0.3)):
        assert value.abs().max() < 1e-5


def test_batches_depend_only_on_the_step_and_mark_only_response_targets():
    data = token_segments(TOKENS, 32, "random tokens", pad_id=0, seed=3)
    assert len(data) == 4096 // 32
    first, again = data.batch(7, 4), data.batch(7, 4)
    assert torch.equal(first.ids, again.ids) and not torch.equal(first.ids, data.batch(8, 4).ids)
    assert first.targets.all() and first.tokens == 4 * 31
    epoch = [tuple(data.batch(step, 4).ids[i].tolist()) for step in range(len(data) // 4) for i in range(4)]
    assert len(set(epoch)) == len(data)  # one epoch reads every segment once
    tokenizer = tiny_tokenizer()
    pairs = [("Say hi", " hi there"), ("A much longer question here", " ok")]
    examples = instruction_examples(tokenizer, pairs, 64, "pairs")
    batch = examples.batch(0, 2)
    for row in range(2):
        example = next(e for e in examples.examples if tuple(batch.ids[row, : len(e.ids)].tolist()) == e.ids)
        n = len(example.ids)
        wanted = torch.zeros(batch.ids.shape[1] - 1, dtype=torch.bool)
        wanted[example.prompt_length - 1 : n - 1] = True  # the predictions of the response's tokens (and EOS)
        assert torch.equal(batch.targets[row], wanted)
        assert batch.attention_mask[row].sum() == n


def test_learning_rate_warms_up_then_decays_to_zero():
    config = TrainingConfig(steps=10, warmup_steps=2)
    factors = [learning_rate_factor(step, config) for step in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.05


@pytest.mark.parametrize("method", ["kd", "reverse-kl", "gkd", "hidden"])
def test_each_objective_brings_a_truncated_student_closer_to_its_teacher(method):
    teacher = tiny_model("llama", blocks=4, **PEAKED)
    student = copy.deepcopy(teacher)
    compress(student, load_recipe({"stages": [{"method": "drop_layers", "count": 2, "criterion": "uniform"}]}))
    before = _kl(student, teacher)
    objective = {"kd": lambda: KnowledgeDistillation(teacher),
                 "reverse-kl": lambda: KnowledgeDistillation(teacher, divergence="reverse"),
                 "gkd": lambda: GeneralizedKD(teacher, lam=0.5, beta=0.5, max_new_tokens=8),
                 "hidden": lambda: HiddenStateDistillation(teacher, student, layer_map_after_removal(4, [1, 3])),
                 }[method]()
    data = token_segments(TOKENS, 64, "random tokens", pad_id=0, prompt_tokens=16)
    result = train(student, objective, data, TrainingConfig(steps=25, lr=3e-3, precision="float32"))
    assert result.tokens > 0 and result.steps == 25
    assert _kl(student, teacher) < 0.8 * before


def test_only_the_selected_parameters_change_and_pruned_zeros_stay():
    model = tiny_model("llama")
    with torch.no_grad():  # a 2:4 pattern in one linear
        weight = model.model.layers[0].mlp.up_proj.weight
        weight.view(-1, 4)[:, :2] = 0
    zeros = model.model.layers[0].mlp.up_proj.weight == 0
    original = {name: p.clone() for name, p in model.named_parameters()}
    data = token_segments(TOKENS, 32, "random tokens", pad_id=0)
    train(model, CrossEntropy(), data, TrainingConfig(steps=3, lr=1e-2, trainable="norms"))
    for name, param in model.named_parameters():
        assert torch.equal(param, original[name]) != ("norm" in name), name
    train(model, CrossEntropy(), data, TrainingConfig(steps=3, lr=1e-2, trainable="all"))
    up = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(up == 0, zeros)  # still exactly 2:4, the same positions
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, original["model.layers.0.mlp.down_proj.weight"])
    assert all(p.requires_grad for p in model.parameters())  # as it found them
    with pytest.raises(SlimlmError, match="selects no parameter"):
        train(model, CrossEntropy(), data, TrainingConfig(steps=1, trainable=["no.such.*"]))


def test_lora_training_merges_into_plain_linears():
    model = tiny_model("llama")
    data = token_segments(TOKENS, 32, "random tokens", pad_id=0)
    before = {name: p.clone() for name, p in model.named_parameters()}
    result = train(model, CrossEntropy(), data, TrainingConfig(steps=3, lr=1e-2, trainable="lora", lora_rank=2))
    # rank 2 x (in + out) per linear: q, o 64+64; k, v 64+32; gate, up, down 64+128; two blocks
    assert result.trainable_parameters == 2 * 2 * (2 * 128 + 2 * 96 + 3 * 192)
    assert set(dict(model.named_parameters())) == set(before)  # merged: the model has its own parameters again
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.get_parameter(q), before[q])


RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from safetensors.torch import save_file
    from slimlm.distill.data import token_segments
    from slimlm.distill.gkd import GeneralizedKD
    from slimlm.distill.trainer import TrainingConfig, train
    from slimlm.models.tiny import tiny_model
    torch.set_num_threads(1)
    mode, out, weights = sys.argv[1:4]
    teacher, student = tiny_model("llama", blocks=2), tiny_model("llama", blocks=1, seed=1)
    tokens = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    data = token_segments(tokens, 32, "random tokens", pad_id=0, prompt_tokens=8)
    objective = GeneralizedKD(teacher, lam=0.5, beta=0.3, max_new_tokens=4)  # random draws: sampling, on/off policy
    def die(step, metrics, model):
        if mode == "kill" and step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    config = TrainingConfig(steps=8, lr=1e-2, warmup_steps=2, checkpoint_every=2, precision="float32")
    train(student, objective, data, config, out_dir=out + "-full" if mode == "full" else out, callback=die,
          resume=True if mode == "resume" else None)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, weights)
""")


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "run"

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), mode, str(out), str(tmp_path / f"{mode}.safetensors")],
                              capture_output=True, text=True, timeout=300)

    killed = run("kill")
    assert killed.returncode == -9, killed.stderr
    assert (out / "checkpoint.pt").is_file() and json.loads((out / "loss.json").read_text())[-1]["step"] == 4
    resumed = run("resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming training after step 4" in resumed.stderr
    full = run("full")
    assert full.returncode == 0, full.stderr
    a, b = load_file(tmp_path / "resume.safetensors"), load_file(tmp_path / "full.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "loss.svg").read_text().startswith("<svg")


def test_on_policy_batches_score_only_what_the_student_sampled():
    model = tiny_model("llama")
    data = token_segments(TOKENS, 32, "random tokens", pad_id=0, prompt_tokens=10)
    batch = data.batch(0, 3)
    sampled = sample_continuations(model, batch, 5, 1.0, torch.Generator().manual_seed(0), eos_id=None, pad_id=0)
    assert sampled.ids.shape == (3, 15)
    assert torch.equal(sampled.ids[:, :10], batch.ids[:, :10])
    assert torch.equal(sampled.targets, torch.arange(14).expand(3, 14) >= 9)  # predictions of tokens 10..14
    again = sample_continuations(model, batch, 5, 1.0, torch.Generator().manual_seed(0), eos_id=None, pad_id=0)
    assert torch.equal(sampled.ids, again.ids)


def test_layer_maps():
    assert uniform_layer_map(2, 4) == [2, 4]
    assert uniform_layer_map(20, 30)[-1] == 30
    assert layer_map_after_removal(6, [1, 5]) == [1, 3, 4, 6]  # kept blocks 0, 2, 3, 4; the last maps to the last
    assert uniform_importance(6, 3) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # every 2nd block
    teacher, student = tiny_model("llama", blocks=4), tiny_model("llama", blocks=2)
    with pytest.raises(SlimlmError, match="last layer must map"):
        HiddenStateDistillation(teacher, student, [1, 2])
    with pytest.raises(SlimlmError, match="one teacher layer"):
        HiddenStateDistillation(teacher, student, [1, 2, 4])


def test_a_recipe_distills_after_compression_from_the_model_before_it(tmp_path):
    teacher = tiny_model("llama", blocks=4, **PEAKED)
    student, baseline = copy.deepcopy(teacher), copy.deepcopy(teacher)
    calibration = TOKENS[:1024].view(16, 64)
    drop = {"method": "drop_layers", "count": 2, "criterion": "uniform"}
    compress(baseline, load_recipe({"stages": [drop], "float_storage": "float32"}), calibration)
    recipe = load_recipe({"stages": [drop, {"method": "rtn", "bits": 8, "group_size": 32},
                                     {"method": "kd", "seqlen": 32, "training": {"steps": 20, "lr": 3e-3}}],
                          "float_storage": "float32"})
    report = compress(student, recipe, calibration, checkpoint_dir=tmp_path / "ckpt")
    trained = [entry for entry in report.structure if entry["method"] == "kd"]
    assert trained and trained[0]["training"]["steps"] == 20
    assert _kl(student, teacher) < 0.8 * _kl(baseline, teacher)
    assert (tmp_path / "ckpt" / "train-kd" / "checkpoint.pt").is_file()  # a killed run would continue from it
    with pytest.raises(SlimlmError, match="after every pruning and quantization stage"):
        load_recipe({"stages": [{"method": "kd"}, {"method": "rtn", "bits": 4}]})


@pytest.mark.parametrize(("stage", "problem"), [
    ({"method": "kd", "temperature": 0}, "temperature"),
    ({"method": "kd", "alpha": 1.5}, "alpha"),
    ({"method": "gkd", "lambda": 1.2}, "lambda"),
    ({"method": "gkd", "beta": -0.1}, "beta"),
    ({"method": "kd", "training": {"lr": 0}}, "lr"),
    ({"method": "hidden", "layer_map": "every"}, "layer_map"),
])
def test_bad_settings_are_refused_before_any_work(stage, problem):
    with pytest.raises(SlimlmError, match=problem):
        load_recipe({"stages": [stage]})


def test_different_vocabularies_are_refused_for_white_box_losses():
    with pytest.raises(SlimlmError, match="one tokenizer"):
        check_same_vocabulary(tiny_model("llama"), tiny_model("llama", vocab_size=262))
    other = tiny_tokenizer(adds_bos=True)
    other.add_tokens(["<extra>"])
    with pytest.raises(SlimlmError, match="tokenizers differ"):
        check_same_vocabulary(tiny_model("llama"), tiny_model("llama"), tiny_tokenizer(), other)
    for bad in ({"temperature": 0.0}, {"alpha": 2.0}):
        with pytest.raises(SlimlmError):
            KnowledgeDistillation(tiny_model("llama"), **bad)
    with pytest.raises(SlimlmError, match="lambda"):
        GeneralizedKD(tiny_model("llama"), lam=1.5)


def test_distill_command_trains_saves_and_refuses_bad_input(tmp_path, capsys):
    from slimlm.cli import main
    from slimlm.models.tiny import save_tiny

    teacher, student = save_tiny(tmp_path / "teacher", blocks=2), save_tiny(tmp_path / "student", blocks=1, seed=1)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    common = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(text), "--seqlen", "32"]
    assert main([*common, "--out", str(out), "--steps", "4", "--precision", "float32"]) == 0
    assert "4 steps" in capsys.readouterr().out
    assert (out / "loss.svg").is_file() and (out / "slimlm.json").is_file()
    assert [row["step"] for row in json.loads((out / "loss.json").read_text())] == [1, 2, 3, 4]
    for extra, message in ((["--temperature", "0"], "temperature"), (["--method", "gkd", "--beta", "2"], "beta"),
                           (["--method", "kd", "--lambda", "0.5"], "--lambda does not apply"),
                           (["--resume"], "no interrupted run")):
        assert main([*common, "--out", str(tmp_path / "other"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "response": f" Answer {i}."}) for i in range(6)))
    assert main([*common[:-4], "--data", str(pairs), "--seqlen", "32", "--method", "gkd", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "instruct"), "--steps", "2"]) == 0
    assert math.isfinite(json.loads((tmp_path / "instruct" / "loss.json").read_text())[-1]["loss"])


def test_minillm_estimator_is_the_gradient_of_the_sequence_reverse_kl():
    """On a tabular policy over every 2-token response from 3 tokens, the expectation of the surrogate's gradient
    under q (alpha = 0, no normalisation) equals the exact gradient of KL(q || p) over sequences (divided by 2),
    so the single-step and long-term parts are split correctly; returns are the paper's R^Norm."""
    from slimlm.distill.minillm import minillm_surrogate, normalised_future_returns, whitened

    torch.manual_seed(0)
    theta = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # row 0: step 1; row 1 + y1: step 2
    teacher = torch.randn(4, 3, dtype=torch.float64)
    sequences = [(a, b) for a in range(3) for b in range(3)]

    def step_log_probs(table: torch.Tensor, y: tuple[int, int]) -> torch.Tensor:
        return torch.log_softmax(table[[0, 1 + y[0]]], dim=-1)  # (T = 2, V = 3)

    def along(log_probs: torch.Tensor, y: tuple[int, int]) -> torch.Tensor:
        return log_probs.gather(-1, torch.tensor(y)[:, None]).sum()

    kl = sum(along(step_log_probs(theta, y), y).exp()
             * (along(step_log_probs(theta, y), y) - along(step_log_probs(teacher, y), y)) for y in sequences)
    (exact,) = torch.autograd.grad(kl, theta)
    expected = torch.zeros_like(theta)
    for y in sequences:
        log_q, log_p = step_log_probs(theta, y), step_log_probs(teacher, y)
        probability = along(log_q, y).exp().detach()
        surrogate = minillm_surrogate(log_q, log_p, torch.tensor(y), torch.ones(2, dtype=torch.float64), alpha=0.0,
                                      length_normalise=False, whiten=False)
        expected += probability * torch.autograd.grad(surrogate, theta)[0]
    assert torch.allclose(expected, exact / 2, atol=1e-10)

    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])  # a response of three steps after a prompt
    assert torch.allclose(normalised_future_returns(rewards, mask), torch.tensor([[3.0, 3.5, 4.0, 0.0, 0.0]]))
    values, mask = torch.tensor([[1.0, 5.0, 2.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = whitened(values, mask)
    assert abs(float(white[mask.bool()].mean())) < 1e-6 and abs(float(white[mask.bool()].pow(2).mean()) - 1) < 1e-4
    assert float(white[0, 3]) == 0.0


def test_minillm_trains_on_teacher_mixed_samples():
    from slimlm.distill.minillm import MiniLLM

    teacher = tiny_model("llama", blocks=4, **PEAKED)
    student = copy.deepcopy(teacher)
    compress(student, load_recipe({"stages": [{"method": "drop_layers", "count": 2, "criterion": "uniform"}]}))
    data = token_segments(TOKENS, 32, "random tokens", pad_id=0, prompt_tokens=8)
    objective = MiniLLM(teacher, alpha=0.2, max_new_tokens=8, pt_weight=0.5)
    loss, shown = objective.loss(student, data.batch(0, 2), torch.Generator().manual_seed(0))
    assert loss.requires_grad and math.isfinite(float(loss.detach())) and shown["reverse_kl"] > 0 and shown["pt"] > 0
    before = {name: p.clone() for name, p in student.named_parameters()}
    result = train(student, objective, data, TrainingConfig(steps=3, lr=1e-3, precision="float32"))
    assert all(math.isfinite(row["loss"]) for row in result.history)
    assert any(not torch.equal(p, before[name]) for name, p in student.named_parameters())
    with pytest.raises(SlimlmError, match="alpha"):
        MiniLLM(teacher, alpha=1.5)


def test_ted_learns_filters_then_distills_through_them():
    from slimlm.distill.ted import FilterLearning, Filters, filter_layers

    assert filter_layers(6, 2, [1, 2, 3, 4, 5, 8]) == ([2, 4, 6], [2, 4, 8])
    teacher = tiny_model("llama", blocks=4, **PEAKED)
    data = token_segments(TOKENS, 32, "random tokens", pad_id=0)
    filters = Filters([2, 4], 64, torch.device("cpu"))
    objective = FilterLearning(teacher, filters)
    start = float(objective.loss(teacher, data.batch(0, 4), torch.Generator())[0].detach())
    frozen = {name: p.clone() for name, p in teacher.named_parameters()}
    train(teacher, objective, data, TrainingConfig(steps=15, lr=1e-2, trainable="none", precision="float32"))
    assert float(objective.loss(teacher, data.batch(0, 4), torch.Generator())[0].detach()) < start  # filters learnt
    assert all(torch.equal(p, frozen[name]) for name, p in teacher.named_parameters())  # the model did not
    student, baseline = copy.deepcopy(teacher), copy.deepcopy(teacher)
    drop = {"method": "drop_layers", "count": 2, "criterion": "uniform"}
    compress(baseline, load_recipe({"stages": [drop], "float_storage": "float32"}))
    recipe = load_recipe({"stages": [drop, {"method": "ted", "seqlen": 32, "filter_interval": 1, "filter_steps": 5,
                                            "training": {"steps": 20, "lr": 3e-3}}], "float_storage": "float32"})
    report = compress(student, recipe, TOKENS[:1024].view(16, 64))
    assert [entry["method"] for entry in report.structure] == ["drop_layers", "ted"]
    assert _kl(student, teacher) < 0.8 * _kl(baseline, teacher)
    assert not any("filter" in name for name, _ in student.named_parameters())  # the filters are not kept


def test_a_quantized_student_keeps_its_grid_and_trains_its_float_parameters():
    teacher = tiny_model("llama", blocks=2, **PEAKED)
    student = copy.deepcopy(teacher)
    recipe = load_recipe({"stages": [{"method": "rtn", "bits": 3, "group_size": 32}], "float_storage": "float32"})
    compress(student, recipe, TOKENS[:512].view(8, 64))
    grid = {name: buffer.clone() for name, buffer in student.named_buffers()}
    before = _kl(student, teacher)
    result = train(student, KnowledgeDistillation(teacher), token_segments(TOKENS, 32, "random tokens", pad_id=0),
                   TrainingConfig(steps=20, lr=3e-3, precision="float32"))
    assert all(torch.equal(buffer, grid[name]) for name, buffer in student.named_buffers())  # packed weights, scales
    assert result.trainable_parameters == 256 * 64 * 2 + 64 * 5  # embeddings, LM head, five norms
    assert _kl(student, teacher) < 0.95 * before


class _FakeOpenAI:
    """An OpenAI-compatible completions server on 127.0.0.1 that answers "<prompt> is answered." and counts."""

    def __init__(self):
        import http.server
        import threading

        owner = self
        self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's name
                self._send({"data": [{"id": "teacher"}]})

            def do_POST(self):  # noqa: N802
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(request)
                self._send({"choices": [{"index": 0, "text": f" {request['prompt'][:12]} is answered."}]})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_black_box_seqkd_from_a_server_and_from_a_local_model(tmp_path, capsys):
    import time

    from slimlm.cli import main
    from slimlm.distill.teachers import LocalTeacher, RemoteTeacher
    from slimlm.models.tiny import save_tiny

    student = save_tiny(tmp_path / "student", blocks=1, seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Say the number {i}"}) for i in range(5)))
    server = _FakeOpenAI()
    try:
        teacher = RemoteTeacher(server.url + "/v1")
        teacher.check()
        assert teacher.complete(["Hello there"], 8) == [" Hello there is answered."]
        common = ["distill", "--method", "seqkd", "--student", str(student), "--data", str(prompts), "--seqlen", "48",
                  "--steps", "3", "--precision", "float32", "--max-new-tokens", "16"]
        out = tmp_path / "out"
        assert main([*common, "--teacher-url", server.url, "--out", str(out)]) == 0, capsys.readouterr().err
        written = [json.loads(line) for line in (tmp_path / "out" / "teacher_responses.jsonl").read_text().splitlines()]
        assert [row["response"] for row in written][:2] == [" Say the numb is answered."] * 2
        assert len(server.requests) == 1 + 5 and server.requests[-1]["max_tokens"] == 16
        # Self-Instruct first: the fake teacher writes one instruction again and again, so one survives ROUGE-L
        assert main([*common, "--teacher-url", server.url, "--self-instruct", "2", "--out", str(tmp_path / "si")]) == 0
        assert (tmp_path / "si" / "instructions.jsonl").read_text().count("\n") == 1
        assert (tmp_path / "si" / "teacher_responses.jsonl").read_text().count("\n") == 5 + 1
    finally:
        server.close()
    start = time.perf_counter()
    assert main([*common, "--teacher-url", server.url, "--out", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "--teacher-url" in err and time.perf_counter() - start < 10
    white_box = ["distill", "--method", "kd", "--student", str(student), "--data", str(prompts)]
    assert main([*white_box, "--teacher-url", "http://127.0.0.1:9", "--out", str(tmp_path / "x")]) == 2
    assert "serves text only" in capsys.readouterr().err
    local = LocalTeacher(tiny_model("llama", vocab_size=262), tiny_tokenizer())
    first = local.complete(["Say one", "A longer prompt here"], 6)
    assert len(first) == 2 and first == local.complete(["Say one", "A longer prompt here"], 6)  # greedy
    teacher_dir = tmp_path / "teacher"
    save_tiny(teacher_dir, blocks=2)
    assert main([*common, "--teacher", str(teacher_dir), "--out", str(tmp_path / "local")]) == 0
    assert (tmp_path / "local" / "teacher_responses.jsonl").is_file()


def test_self_instruct_keeps_new_instructions_and_drops_near_duplicates(tmp_path):
    from slimlm.distill.self_instruct import acceptable, first_task, generate_instructions, rouge_l, task_prompt

    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("red fish", "blue bird") == 0.0
    assert abs(rouge_l("The cat sat.", "the cat sat down") - 2 * 1.0 * 0.75 / 1.75) < 1e-12
    assert not acceptable("Draw a picture of a cat", [])  # a text model cannot
    assert not acceptable("Hi", [])  # too short
    assert not acceptable("Write a poem about the sea", ["Write a poem about the sea please"])  # near-duplicate
    assert acceptable("List three prime numbers above ten", ["Write a poem about the sea"])
    assert task_prompt(["A b c", "D e f"]).endswith("Task 2: D e f\nTask 3:")
    assert first_task(" Name a colour.\nTask 10: more") == "Name a colour."

    class Scripted:  # a teacher that writes from a fixed list (one duplicate, one filtered)
        name = "scripted"

        def __init__(self):
            self.answers = iter([" Name three rivers in Europe.", " Name three rivers in Europe!",
                                 " Draw a map of Spain.", " Explain why the sky is blue.", " Count to five in French."])

        def complete(self, prompts, max_new_tokens, temperature, seed):
            return [next(self.answers, " ") for _ in prompts]

    seeds = ["Write a haiku about winter.", "Translate 'good morning' into German."]
    cache = tmp_path / "instructions.jsonl"
    kept = generate_instructions(Scripted(), seeds, 3, per_round=5, cache=cache)
    assert kept == ["Name three rivers in Europe.", "Explain why the sky is blue.", "Count to five in French."]
    assert [json.loads(line)["instruction"] for line in cache.read_text().splitlines()] == kept
    assert generate_instructions(Scripted(), seeds, 3, cache=cache) == kept  # a rerun continues from the file


def test_chain_of_thought_data_and_the_cot_command(tmp_path, capsys, data_dir):
    from slimlm.cli import main
    from slimlm.distill.cot import Problem, accuracy, last_number, read_problems, training_pairs
    from slimlm.models.tiny import save_tiny

    problems = read_problems("gsm8k", data_dir, "test", limit=3)
    assert problems[0].answer == "18" and problems[0].question.startswith("Janet")
    assert last_number("so 1,234.0 apples and then 7.") == "7" and last_number("1,234.0") == "1234"
    assert last_number("no digits") is None
    rationales = [[{"rationale": "16 - 7 = 9, 9 * 2 = 18.", "predicted": "18"},
                   {"rationale": "wrong", "predicted": "5"}]] + [[{"rationale": "r", "predicted": None}] * 2] * 2
    kept = training_pairs("fine-tune-cot", problems, rationales)  # only the right rationale
    assert kept == [(f"{problems[0].question} ###", " 16 - 7 = 9, 9 * 2 = 18. --> 18 END")]
    both = training_pairs("step-by-step", problems, rationales)
    assert [prompt.split(" ")[0] for prompt, _ in both] == ["[label]", "[rationale]"] * 3
    plain = [(f"[label] {p.question}", f" {p.answer}") for p in problems]
    assert training_pairs("answer-only", problems, None) == plain
    with pytest.raises(SlimlmError, match="none of the teacher's rationales"):
        training_pairs("fine-tune-cot", problems[1:], rationales[1:])
    model, tokenizer = tiny_model("llama", vocab_size=262), tiny_tokenizer()
    assert accuracy(model, tokenizer, [Problem("one plus one?", "2")], "step-by-step", 4) in (0.0, 1.0)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps({"question": f"What is {i} plus 1?", "answer": f"... #### {i + 1}"})
                                   for i in range(4)))
    teacher, student = save_tiny(tmp_path / "teacher", blocks=2), save_tiny(tmp_path / "student", blocks=1, seed=1)
    common = ["distill", "--method", "cot", "--student", str(student), "--data", str(questions), "--seqlen", "64",
              "--steps", "2", "--precision", "float32", "--max-new-tokens", "8"]
    assert main([*common, "--cot-style", "step-by-step", "--teacher", str(teacher),
                 "--out", str(tmp_path / "sbs")]) == 0
    written = (tmp_path / "sbs" / "rationales.jsonl").read_text().splitlines()
    assert len(written) == 4 and {"rationale", "predicted"} <= set(json.loads(written[0]))
    assert main([*common, "--cot-style", "answer-only", "--out", str(tmp_path / "plain")]) == 0  # no teacher needed
    assert main([*common, "--cot-style", "fine-tune-cot", "--out", str(tmp_path / "ft")]) == 2
    assert "pass --teacher MODEL or --teacher-url URL" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_left_padded_sampling_matches_one_prompt_at_a_time(family):
    from slimlm.distill.data import Batch
    from slimlm.distill.sampling import sample_batch

    model = tiny_model(family, **({} if family == "gpt2" else PEAKED))
    ids = TOKENS[:40].view(2, 20).clone()
    lengths = torch.tensor([7, 20])
    batch = Batch(ids, torch.ones_like(ids), torch.zeros(2, 19, dtype=torch.bool), lengths)

    def greedy(logits):
        return torch.nn.functional.one_hot(logits[0].argmax(-1), logits[0].shape[-1]).float()

    together = sample_batch([model], batch, 6, greedy, torch.Generator(), None, 0)
    for row in range(2):
        alone = Batch(ids[row : row + 1], torch.ones_like(ids[row : row + 1]), torch.zeros(1, 19, dtype=torch.bool),
                      lengths[row : row + 1])
        single = sample_batch([model], alone, 6, greedy, torch.Generator(), None, 0)
        n = int(lengths[row]) + 6
        assert torch.equal(together.ids[row, :n], single.ids[0, :n])


def test_compress_command_runs_a_recipe_that_ends_in_distillation(tmp_path, capsys):
    from slimlm.cli import main
    from slimlm.models.tiny import save_tiny

    model = save_tiny(tmp_path / "model", blocks=4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - {method: drop_layers, count: 2, criterion: uniform}\n"
                      "  - {method: kd, seqlen: 32, training: {steps: 3, lr: 1.0e-3}}\n")
    out = tmp_path / "out"
    assert main(["compress", "--model", str(model), "--recipe", str(recipe), "--out", str(out), "--calib-corpus",
                 "pydoc", "--calib-samples", "4", "--calib-seqlen", "64"]) == 0, capsys.readouterr().err
    saved = json.loads((out / "slimlm.json").read_text())
    assert [stage["method"] for stage in saved["recipe"]["stages"]] == ["drop_layers", "kd"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert not (tmp_path / ".out.resume").exists()  # the checkpoint (with the training's) is gone once saved
