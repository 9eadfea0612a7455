"""Distributed calibration: `torchrun --nproc-per-node 2 -m slimlm compress` (gloo, two CPU processes) gives the
single-process result: the Hessians and channel sums agree to float32 rounding, so the saved tensors are equal
(GPTQ's rounding may flip where a weight sits on a grid boundary: at most 0.5% of the bytes may differ)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimlm.models.tiny import save_tiny

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="PyTorch without torch.distributed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", blocks=3)


def _compress(model_dir: Path, out: Path, recipe: str, processes: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--standalone", "-m"] if processes > 1 else [sys.executable, "-m"]
    arguments = ["slimlm", "compress", "--model", str(model_dir), "--recipe", recipe, "--calib-corpus", "pydoc",
                 "--calib-samples", "9", "--calib-seqlen", "64", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([*launcher, *arguments], capture_output=True, text=True, env=env, timeout=300)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(next(out.glob("*.safetensors")))


@pytest.mark.parametrize("recipe", ["gptq-w4g64", "sparsegpt-2of4", "wanda-2of4"])
def test_two_processes_give_the_single_process_result(model_dir, tmp_path, recipe):
    one = _compress(model_dir, tmp_path / "one", recipe, 1, "--threads", "1")
    two = _compress(model_dir, tmp_path / "two", recipe, 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved to") == 1  # one process writes and reports
    single, double = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert single.keys() == double.keys()
    differing = sum(int((single[k] != double[k]).sum()) for k in single)
    total = sum(t.numel() for t in single.values())
    assert differing <= 0.005 * total, (differing, total)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no checkpoint or staging left


def test_methods_that_cannot_be_spread_are_refused_before_work(model_dir, tmp_path):
    result = _compress(model_dir, tmp_path / "out", "awq-w4g64", 2)
    assert result.returncode != 0
    assert "awq cannot calibrate across processes" in result.stderr
    assert not (tmp_path / "out").exists()


def test_other_commands_refuse_torchrun(model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                             "-m", "slimlm", "info", "--model", str(model_dir)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode != 0 and "only slimlm compress runs under torchrun" in result.stderr
