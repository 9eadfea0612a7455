"""Resumable compression: a run stopped after any block and continued from its checkpoint gives bitwise the
weights and saved bytes of an uninterrupted run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from slimlm.compress import compress
from slimlm.compress.resume import BlockCheckpoint
from slimlm.errors import SlimlmError
from slimlm.export.native import save
from slimlm.models.tiny import tiny_model

CALIBRATION = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(1))
RECIPES = {
    "gptq": {"stages": [{"method": "gptq", "bits": 4, "group_size": 16}]},
    "awq": {"stages": [{"method": "awq", "bits": 3, "group_size": 16, "grid": 4, "clip_grid": 4}]},
    "sparsegpt-then-gptq": {"stages": [{"method": "sparsegpt", "pattern": "2:4"},
                                       {"method": "gptq", "bits": 4, "group_size": 16}]},
    "wanda-owl": {"stages": [{"method": "wanda", "sparsity": 0.5, "owl": {}}]},
    "gptq-eora": {"stages": [{"method": "gptq", "bits": 3, "group_size": 16},
                             {"method": "eora", "rank": 4, "factor_bits": 4}]},
    "drop-then-gptq": {"stages": [{"method": "drop_layers", "count": 1},
                                  {"method": "gptq", "bits": 4, "group_size": 16}]},
    "rtn": {"stages": [{"method": "rtn", "bits": 4, "group_size": 16}]},
}


def _model(family: str = "llama"):
    return tiny_model(family, blocks=4, vocab_size=256)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


class _Stop(Exception):
    pass


def _stop_after(monkeypatch, block: int) -> None:
    """Make the run die right after block `block`'s checkpoint is written (as a kill would)."""
    original = BlockCheckpoint.save

    def save_then_stop(self, model, adapter, index, *args, **kwargs):
        original(self, model, adapter, index, *args, **kwargs)
        if index == block:
            raise _Stop

    monkeypatch.setattr(BlockCheckpoint, "save", save_then_stop)


def _uninterrupted(recipe: dict, tmp_path: Path, family: str = "llama") -> tuple[dict, dict]:
    model = _model(family)
    compress(model, recipe, CALIBRATION, checkpoint_dir=tmp_path / "straight.resume")
    save(model, tmp_path / "straight", recipe=recipe)
    return model.state_dict(), _digest(tmp_path / "straight")


@pytest.mark.parametrize("name", list(RECIPES))
def test_resumed_run_is_bitwise_the_uninterrupted_one(name, tmp_path, monkeypatch):
    recipe = RECIPES[name]
    expected_state, expected_files = _uninterrupted(recipe, tmp_path)
    checkpoint = tmp_path / "run.resume"
    with monkeypatch.context() as patch:
        _stop_after(patch, 1)
        with pytest.raises(_Stop):
            compress(_model(), recipe, CALIBRATION, checkpoint_dir=checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "block-0000.json", "block-0000.safetensors", "block-0001.json", "block-0001.safetensors",
        "inputs-0002.safetensors", "state.json"]
    model = _model()
    report = compress(model, recipe, CALIBRATION, checkpoint_dir=checkpoint)
    state = model.state_dict()
    assert state.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(state[key], tensor), key
    save(model, tmp_path / "resumed", recipe=recipe)
    assert _digest(tmp_path / "resumed") == expected_files
    assert {layer.name.split(".")[2] for layer in report.layers} == {str(i) for i in range(len(model.model.layers))}


def test_resume_on_another_architecture(tmp_path, monkeypatch):
    recipe = RECIPES["gptq"]
    expected_state, _ = _uninterrupted(recipe, tmp_path, "gpt2")
    checkpoint = tmp_path / "run.resume"
    with monkeypatch.context() as patch:
        _stop_after(patch, 2)
        with pytest.raises(_Stop):
            compress(_model("gpt2"), recipe, CALIBRATION, checkpoint_dir=checkpoint)
    model = _model("gpt2")
    compress(model, recipe, CALIBRATION, checkpoint_dir=checkpoint)
    assert all(torch.equal(model.state_dict()[k], t) for k, t in expected_state.items())


def test_checkpoint_of_another_run_is_not_used(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "run.resume"
    with monkeypatch.context() as patch:
        _stop_after(patch, 1)
        with pytest.raises(_Stop):
            compress(_model(), RECIPES["gptq"], CALIBRATION, checkpoint_dir=checkpoint)
    other = {"stages": [{"method": "gptq", "bits": 3, "group_size": 16}]}
    expected_state, _ = _uninterrupted(other, tmp_path)
    model = _model()
    compress(model, other, CALIBRATION, checkpoint_dir=checkpoint)
    assert "checkpoint of another run" in capsys.readouterr().err
    assert all(torch.equal(model.state_dict()[k], t) for k, t in expected_state.items())
    # other calibration tokens make another run too
    assert "another run" not in capsys.readouterr().err
    compress(_model(), other, CALIBRATION + 1, checkpoint_dir=checkpoint)
    assert "checkpoint of another run" in capsys.readouterr().err


def test_damaged_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    checkpoint = tmp_path / "run.resume"
    with monkeypatch.context() as patch:
        _stop_after(patch, 1)
        with pytest.raises(_Stop):
            compress(_model(), RECIPES["gptq"], CALIBRATION, checkpoint_dir=checkpoint)
    (checkpoint / "block-0001.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(SlimlmError, match="cannot resume .*block-0001.safetensors.*--restart"):
        compress(_model(), RECIPES["gptq"], CALIBRATION, checkpoint_dir=checkpoint)


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama of 24 blocks with a byte-level tokenizer, for the command-line runs."""
    from slimlm.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama-24"), "llama", blocks=24)


def _command(model: Path, out: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "slimlm", "compress", "--model", str(model), "--recipe", "gptq-w4g64",
            "--calib-corpus", "pydoc", "--calib-samples", "16", "--calib-seqlen", "64", "--out", str(out), *extra]


def test_kill_9_then_rerun_gives_the_same_bytes_and_no_leftovers(deep_dir, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_command(deep_dir, tmp_path / "straight"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    state = tmp_path / ".killed.resume" / "state.json"
    process = subprocess.Popen(_command(deep_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["next_block"] >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    rerun = subprocess.run(_command(deep_dir, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming after block" in rerun.stderr
    assert _digest(out) == _digest(tmp_path / "straight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "straight"]  # no staging or checkpoint left


def test_resume_without_a_checkpoint_is_refused_before_work(deep_dir, tmp_path):
    import subprocess

    result = subprocess.run(_command(deep_dir, tmp_path / "out", "--resume"), capture_output=True, text=True)
    assert result.returncode == 2
    assert "--resume: no interrupted run" in result.stderr
    assert not (tmp_path / "out").exists()
