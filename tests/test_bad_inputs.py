"""Bad input is refused before any work: exit code 2, one line naming the problem and the fix, nothing written.
Each case runs the CLI as a user does, in its own process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.models.tiny import save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return build_models(tmp_path_factory.mktemp("bad-inputs"))


def build_models(root: Path) -> Path:
    """A tiny Llama directory and damaged copies of it, a slimlm checkpoint and damaged copies, a Latin-1 text
    file, and tiny Phi and GPT-2 directories, in `root` (also used by benchmarks/reliability.py)."""
    tiny = save_tiny(root / "tiny", "llama")
    for name in ("truncated", "no-tokenizer", "unknown-type", "pickle"):
        shutil.copytree(tiny, root / name)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    for path in (root / "no-tokenizer").glob("tokenizer*"):
        path.unlink()
    config = json.loads((root / "unknown-type" / "config.json").read_text())
    (root / "unknown-type" / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))
    state = {k: v.clone() for k, v in tiny_model("llama", vocab_size=262).state_dict().items()}
    (root / "pickle" / "model.safetensors").unlink()
    torch.save(state, root / "pickle" / "pytorch_model.bin")
    assert cli("compress", "--model", str(tiny), "--recipe", "rtn-w4g64", "--out", str(root / "q")).returncode == 0
    for name in ("q-truncated", "q-broken-json", "q-bad-dtype"):
        shutil.copytree(root / "q", root / name)
    weights = next((root / "q-truncated").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1000])
    (root / "q-broken-json" / "slimlm.json").write_text('{"format_version": 1, "dtype": ')
    section = json.loads((root / "q-bad-dtype" / "slimlm.json").read_text())
    (root / "q-bad-dtype" / "slimlm.json").write_text(json.dumps({**section, "dtype": "float99"}))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin1") * 200)
    for family in ("phi", "gpt2"):
        save_tiny(root / family, family)
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "slimlm", *args], capture_output=True, text=True, env=env,
                          timeout=300)


# (name, arguments with {root} and {out}, a fragment the message must hold)
CASES = [
    ("unwritable --out", ["compress", "--model", "{root}/tiny", "--recipe", "rtn-w4g64", "--out", "/proc/slimlm-out"],
     "cannot write --out"),
    ("unwritable --json", ["compress", "--model", "{root}/tiny", "--recipe", "rtn-w4g64", "--out", "{out}",
                           "--json", "/proc/result.json"], "cannot write --json"),
    ("--export-ct is --out", ["compress", "--model", "{root}/tiny", "--recipe", "gptq-w4g64", "--calib-corpus",
                              "pydoc", "--out", "{out}", "--export-ct", "{out}"], "overlap"),
    ("truncated safetensors", ["eval", "--model", "{root}/truncated", "--tasks", "pydoc", "--seqlen", "64"],
     "is damaged"),
    ("truncated slimlm weights", ["eval", "--model", "{root}/q-truncated", "--tasks", "pydoc", "--seqlen", "64"],
     "is damaged"),
    ("broken slimlm.json", ["eval", "--model", "{root}/q-broken-json", "--tasks", "pydoc", "--seqlen", "64"],
     "is not valid JSON"),
    ("slimlm.json dtype", ["eval", "--model", "{root}/q-bad-dtype", "--tasks", "pydoc", "--seqlen", "64"],
     "'float99' is not a torch dtype"),
    ("no tokenizer", ["eval", "--model", "{root}/no-tokenizer", "--tasks", "pydoc", "--seqlen", "64"],
     "has no tokenizer files"),
    ("unknown model_type", ["eval", "--model", "{root}/unknown-type", "--tasks", "pydoc", "--seqlen", "64"],
     "model_type 'nosuchmodel'"),
    ("pickle weights", ["eval", "--model", "{root}/pickle", "--tasks", "pydoc", "--seqlen", "64"],
     "pickle weights (pytorch_model.bin)"),
    ("missing local path", ["eval", "--model", "{root}/nowhere", "--tasks", "pydoc"], "no such file or directory"),
    ("non-UTF-8 text", ["eval", "--model", "{root}/tiny", "--tasks", "{root}/latin1.txt", "--seqlen", "16"],
     "is not UTF-8 text (byte 0xe9"),
    ("--calib-seqlen 1", ["compress", "--model", "{root}/tiny", "--recipe", "gptq-w4g64", "--calib-corpus", "pydoc",
                          "--calib-seqlen", "1", "--out", "{out}"], "seqlen: Input should be greater than or equal"),
    ("--device cuda", ["compress", "--model", "{root}/tiny", "--recipe", "rtn-w4g64", "--out", "{out}", "--device",
                       "cuda"], "--device cuda"),
    ("awq on Phi-style blocks", ["compress", "--model", "{root}/phi", "--recipe", "awq-w4g64", "--calib-corpus",
                                 "pydoc", "--out", "{out}"], "AWQ folds scales"),
    ("--seqlen past the context", ["eval", "--model", "{root}/tiny", "--tasks", "pydoc", "--seqlen", "4096"],
     "longer than the model's context of 512"),
    ("--calib-seqlen past the context", ["compress", "--model", "{root}/tiny", "--recipe", "gptq-w4g64",
                                         "--calib-corpus", "pydoc", "--calib-seqlen", "1024", "--out", "{out}"],
     "longer than the model's context of 512"),
    ("prompt past the context", ["generate", "--model", "{root}/tiny", "--prompt", "hello", "--max-new-tokens",
                                 "600"], "longer than the model's context of 512"),
    ("--kl without --eval", ["compress", "--model", "{root}/tiny", "--recipe", "rtn-w4g64", "--out", "{out}", "--kl"],
     "add --eval"),
    ("calibration past the RAM", ["compress", "--model", "{root}/tiny", "--recipe", "gptq-w4g64", "--calib-corpus",
                                  "pydoc", "--calib-samples", "20000000", "--calib-seqlen", "512", "--out", "{out}"],
     "pass --force"),
    ("--export-ct of GPT-2", ["compress", "--model", "{root}/gpt2", "--recipe", "rtn-w4g64", "--out", "{out}",
                              "--export-ct", "{out}-ct"], "transposed Conv1D layers"),
    ("--calib-corpus unused", ["compress", "--model", "{root}/tiny", "--recipe", "rtn-w4g64", "--out", "{out}",
                               "--calib-corpus", "pydoc"], "uses no calibration data"),
]


@pytest.mark.parametrize(("name", "arguments", "message"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_before_any_work(models, tmp_path, name, arguments, message):
    out = tmp_path / "out"
    result = cli(*(a.format(root=models, out=out) for a in arguments))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimlm: error: ") and message in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not Path(f"{out}-ct").exists()


def test_two_identical_runs_write_identical_bytes(models, tmp_path):
    def digests(directory: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    runs = []
    for name in ("a", "b"):
        arguments = ["compress", "--model", str(models / "tiny"), "--recipe", "gptq-w4g64", "--calib-corpus",
                     "pydoc", "--calib-samples", "8", "--calib-seqlen", "64", "--threads", "1",
                     "--out", str(tmp_path / name)]
        assert cli(*arguments).returncode == 0
        runs.append(digests(tmp_path / name))
    assert runs[0] == runs[1] and len(runs[0]) >= 4


def test_outputs_follow_the_umask_and_leftovers_of_a_killed_run_are_reported(models, tmp_path):
    leftover = tmp_path / ".out.tmp-deadbeef"
    leftover.mkdir()
    (leftover / "slimlm.json").write_text("{")
    previous = os.umask(0o027)
    try:
        from slimlm.export.native import save

        save(tiny_model("llama", vocab_size=262), tmp_path / "out", tiny_tokenizer())
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o640}
    assert leftover.exists()  # reported, not removed: another run might be writing it
    result = cli("compress", "--model", str(models / "tiny"), "--recipe", "rtn-w4g64", "--out", str(tmp_path / "out"),
                 "--overwrite")
    assert result.returncode == 0 and "left by an interrupted run" in result.stderr and str(leftover) in result.stderr


def test_help_and_argument_errors_answer_without_importing_torch():
    import time

    for arguments in (["--help"], ["compress", "--recipe", "gptq-w4g64"]):  # the second lacks --out
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            result = cli(*arguments)
            seconds.append(time.perf_counter() - start)
        assert result.returncode in (0, 2) and min(seconds) < 1.0, (arguments, seconds)
    probe = "import sys, slimlm, slimlm.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_staging_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    import fcntl

    from slimlm.export.native import WRITER_LOCK, clean_leftovers, save

    dead, live = tmp_path / ".out.tmp-dead", tmp_path / ".out.tmp-live"
    for folder in (dead, live):
        folder.mkdir()
        (folder / WRITER_LOCK).touch()
    with open(live / WRITER_LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer that is still running
        save(tiny_model("llama", vocab_size=262), tmp_path / "out")
        assert not dead.exists() and live.exists()
        old = tmp_path / ".out.old-999999999"  # a run killed between renaming the old output away and the new in
        os.rename(tmp_path / "out", old)
        assert clean_leftovers(tmp_path / "out") == [live]
        assert (tmp_path / "out" / "slimlm.json").is_file() and not old.exists()
    assert clean_leftovers(tmp_path / "out") == [] and not live.exists()  # its writer is gone now


def test_existing_out_with_a_checkpoint_beside_it_says_so(models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").touch()
    (tmp_path / ".out.resume").mkdir()
    result = cli("compress", "--model", str(models / "tiny"), "--recipe", "rtn-w4g64", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "checkpoint of an interrupted run" in result.stderr
