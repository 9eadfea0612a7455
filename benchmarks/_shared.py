"""What the compression benchmarks share: identical token files for slimlm and the peer tools, one
child process per job (so each job's peak memory is its own), the quality evaluation, the
llm-compressor call, and a resumable progress file."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = Path(__file__).resolve().parent / "peers"
ZERO_SHOT = ("piqa", "arc_easy", "hellaswag")


def token_files(data_dir: str, proto: dict, tag: str) -> dict:
    """Calibration segments and WikiText-2 evaluation windows, written once so both tools read the same tokens."""
    import torch
    from safetensors.torch import save_file

    from slimlm.data.calibration import calibration_samples, tokenize_corpus
    from slimlm.data.corpora import load_corpus
    from slimlm.eval.perplexity import token_windows
    from slimlm.models.loading import embedded_gguf_path, gguf_to_directory, load_model

    directory = Path(tempfile.gettempdir()) / f"slimlm-{tag}"
    directory.mkdir(exist_ok=True)
    paths = {"calib_pt": directory / "calib.pt", "calib": directory / "calib.safetensors",
             "eval": directory / "eval.safetensors", "model_dir": gguf_to_directory(embedded_gguf_path("smollm2-135m"))}
    if not all(paths[key].is_file() for key in ("calib_pt", "calib", "eval")):
        tokenizer = load_model("smollm2-135m").tokenizer
        c = proto["calibration"]
        calibration = calibration_samples(tokenizer, "c4", c["samples"], c["seqlen"], c["seed"], data_dir)
        torch.save(calibration, paths["calib_pt"])
        save_file({"input_ids": calibration.contiguous()}, str(paths["calib"]))
        p = proto["perplexity"]
        ids = tokenize_corpus(tokenizer, load_corpus("wikitext2", "eval", data_dir))
        save_file({"input_ids": token_windows(ids, p["seqlen"], p["max_windows"]).contiguous()}, str(paths["eval"]))
    return {key: str(value) for key, value in paths.items()}


def run_child(script: str, data_dir: str, spec: dict) -> dict:
    """Run `script --job SPEC` in a fresh process and return the JSON it prints after `RESULT `."""
    done = subprocess.run([sys.executable, script, "--data-dir", data_dir, "--job", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"job {spec.get('config')}/{spec.get('method')} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def evaluate_quality(model, tokenizer, proto: dict, data_dir: str) -> dict:
    """WikiText-2 perplexity and KL from float32, C4 perplexity, and the zero-shot tasks."""
    from slimlm.eval.kl import kl_divergence
    from slimlm.eval.perplexity import perplexity
    from slimlm.eval.zeroshot import evaluate_task
    from slimlm.models.loading import load_model

    windows, result = proto["perplexity"], {}
    reference = load_model("smollm2-135m").model
    kl = kl_divergence(model, reference, tokenizer, "wikitext2", windows["seqlen"], windows["max_windows"], data_dir)
    del reference
    result.update(wikitext2_ppl=kl.ppl, kl_mean=kl.kl_mean, top1_agreement=kl.top1_agreement)
    result["c4_ppl"] = perplexity(model, tokenizer, "c4", windows["seqlen"], windows["max_windows"], data_dir).ppl
    for task in proto["zero_shot"]["tasks"]:
        scores = evaluate_task(model, tokenizer, task, data_dir, proto["zero_shot"]["limit"])
        result[f"{task}_acc_norm" if task != "arc_easy" else "arc_easy_acc"] = (
            scores["acc"] if task == "arc_easy" else scores["acc_norm"])
    return result


def llmcompressor(tokens: dict, extra: list[str]) -> dict:
    """Run `benchmarks/peers/llmcompressor_run.py` in its own virtual environment; returns its result JSON."""
    python = PEERS / ".venv-llmcompressor" / "bin" / "python"
    if not python.is_file():
        subprocess.run(["bash", str(PEERS / "setup_llmcompressor.sh")], check=True)
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "result.json"
        done = subprocess.run([str(python), str(PEERS / "llmcompressor_run.py"), "--model", tokens["model_dir"],
                               "--calib", tokens["calib"], "--eval", tokens["eval"], *extra, "--out", str(out)],
                              capture_output=True, text=True)
        if not out.is_file():
            raise RuntimeError(f"llm-compressor {' '.join(extra)} wrote no result:\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


class Progress:
    """Finished jobs by key, kept in a file so an interrupted run resumes where it stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, key: str, compute) -> dict:
        from slimlm.results import atomic_write_text, utc_now

        if key not in self.done:
            start = time.perf_counter()
            self.done[key] = compute()
            self.done[key]["job_seconds"] = round(time.perf_counter() - start, 1)
            atomic_write_text(self.path, json.dumps(self.done, indent=1))
            print(f"[{utc_now()}] {key}: {json.dumps(self.done[key])}", flush=True)
        return self.done[key]
