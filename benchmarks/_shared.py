"""What the compression benchmarks share: identical token files for slimlm and the peer tools, one
child process per job (so each job's peak memory is its own), the quality evaluation, the
llm-compressor call, and a resumable progress file."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = Path(__file__).resolve().parent / "peers"
ZERO_SHOT = ("piqa", "arc_easy", "hellaswag")


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_arguments(doc: str, configs: dict, methods: dict, out: Path, add_options=None) -> argparse.Namespace:
    """The options every compression benchmark takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--limit", type=int, default=200, help="first N examples of each zero-shot task")
    parser.add_argument("--quick", action="store_true", help="tiny protocol, to check the script")
    def listed(names) -> str:  # argparse expands % in help texts
        return "comma-separated subset of " + ", ".join(names).replace("%", "%%")

    parser.add_argument("--configs", default=",".join(configs), help=listed(configs))
    parser.add_argument("--methods", default=",".join(methods), help=listed(methods))
    parser.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one slimlm job and print its JSON
    if add_options is not None:  # a script's own options
        add_options(parser)
    return parser.parse_args()


def start(doc: str, configs: dict, methods: dict, name: str, prompt_tokens: int, run_job, add_options=None,
          max_windows: int = 40):
    """A benchmark script's opening: parse its options; as a job child, run the job, print it and
    return None; else return (args, protocol, output path, Progress, token files)."""
    args = parse_arguments(doc, configs, methods, RESULTS_DIR / name, add_options)
    if args.job:
        print("RESULT " + json.dumps(run_job(json.loads(args.job))), flush=True)
        return None
    proto = protocol(args, prompt_tokens, max_windows)
    out = Path(args.out)
    if args.quick and out.parent == RESULTS_DIR:  # a script check never replaces committed results
        out = out.with_name(out.name + "-quick")
    progress = Progress(out.parent / f".{out.name}.partial.json")
    return args, proto, out, progress, token_files(args.data_dir, proto, f"{name}-quick" if args.quick else name)


def protocol(args: argparse.Namespace, prompt_tokens: int, max_windows: int = 40) -> dict:
    """128 x 512 C4 calibration tokens, `max_windows` WikiText-2 / C4 windows of 512, zero-shot on `--limit`
    examples, latency with a `prompt_tokens` prompt; `--quick` shrinks everything to check a script."""
    quick = args.quick
    return {
        "calibration": {"corpus": "c4 docs 0-999", "samples": 8 if quick else 128, "seqlen": 128 if quick else 512,
                        "seed": 0},
        "perplexity": {"seqlen": 512, "max_windows": 2 if quick else max_windows},
        "zero_shot": {"tasks": list(ZERO_SHOT), "limit": 10 if quick else args.limit},
        "speed": {"prompt_tokens": prompt_tokens, "new_tokens": 8 if quick else 32, "repeats": 1 if quick else 3},
    }


def token_files(data_dir: str, proto: dict, tag: str) -> dict:
    """Calibration segments and WikiText-2 evaluation windows, written once so both tools read the same tokens."""
    import torch
    from safetensors.torch import save_file

    from slimlm.data.calibration import calibration_samples
    from slimlm.data.corpora import load_corpus
    from slimlm.eval.perplexity import corpus_windows
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
        windows, _, _ = corpus_windows(tokenizer, load_corpus("wikitext2", "eval", data_dir), p["seqlen"],
                                       p["max_windows"])
        save_file({"input_ids": windows.contiguous()}, str(paths["eval"]))
    return {key: str(value) for key, value in paths.items()}


def compress_job(spec: dict, seconds_key: str):
    """Inside a job: load the default model and apply the job's stage (if any) to it, timed.

    Returns (model, tokenizer, result dict with config, method, `seconds_key` and peak_rss_bytes, report)."""
    import resource

    import torch

    from slimlm.compress import compress
    from slimlm.models.loading import load_model

    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    result, report = {"config": spec["config"], "method": spec["method"]}, None
    if spec["stage"] is not None:
        calibration = torch.load(spec["calibration"], weights_only=True)
        start = time.perf_counter()
        batch = {"batch_size": spec.get("calibration_batch_size", 8)}
        report = compress(lm.model, {"stages": [spec["stage"]], "calibration": batch}, calibration=calibration)
        result[seconds_key] = time.perf_counter() - start
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return lm.model, lm.tokenizer, result, report


def run_child(script: str, data_dir: str, spec: dict) -> dict:
    """Run `script --job SPEC` in a fresh process and return the JSON it prints after `RESULT `."""
    done = subprocess.run([sys.executable, script, "--data-dir", data_dir, "--job", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"job {spec.get('config')}/{spec.get('method')} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def evaluate_quality(model, tokenizer, proto: dict, data_dir: str, c4: bool = True) -> dict:
    """WikiText-2 perplexity and KL from float32, C4 perplexity (unless `c4` is False), and the zero-shot tasks."""
    from slimlm.eval.kl import kl_divergence
    from slimlm.eval.perplexity import perplexity
    from slimlm.eval.zeroshot import evaluate_task
    from slimlm.models.loading import load_model

    windows, result = proto["perplexity"], {}
    reference = load_model("smollm2-135m").model
    kl = kl_divergence(model, reference, tokenizer, "wikitext2", windows["seqlen"], windows["max_windows"], data_dir)
    del reference
    result.update(wikitext2_ppl=kl.ppl, kl_mean=kl.kl_mean, top1_agreement=kl.top1_agreement)
    if c4:
        result["c4_ppl"] = perplexity(model, tokenizer, "c4", windows["seqlen"], windows["max_windows"], data_dir).ppl
    for task in proto["zero_shot"]["tasks"]:
        scores = evaluate_task(model, tokenizer, task, data_dir, proto["zero_shot"]["limit"])
        result[f"{task}_acc_norm" if task != "arc_easy" else "arc_easy_acc"] = (
            scores["acc"] if task == "arc_easy" else scores["acc_norm"])
    return result


def llmcompressor_row(tokens: dict, extra: list[str], config: str, algo: str, seconds_key: str) -> dict:
    """A result row for llm-compressor on `config` (its ppl, time and peak memory under our names)."""
    peer = llmcompressor(tokens, extra)
    return {"config": config, "method": f"llm-compressor {algo}", "status": peer["status"],
            "wikitext2_ppl": peer.get("ppl"), seconds_key: peer.get("compression_seconds"),
            "peak_rss_bytes": peer.get("peak_rss_bytes"), "error": (peer.get("error") or "")[:200] or None,
            "versions": peer.get("versions")}


def preamble(title: str, result: dict, compressed: str) -> str:
    """A results page's opening: title, command, machine, date and the protocol every benchmark shares
    (`compressed` names the models compared with float32: "quantized", "pruned")."""
    m, v, p = result["machine"], result["versions"], result["protocol"]
    c, w = p["calibration"], p["perplexity"]
    return (
        f"# {title}: {result['model']}\n\nCommand: `{result['command']}`  \nMachine: {m['cpu']}, {m['cores']} "
        f"cores; torch {v['torch']}, transformers {v['transformers']}  \nDate: {result['date']}\n\n"
        f"Calibration: {c['samples']} x {c['seqlen']} tokens of {c['corpus']}, seed {c['seed']} (identical tokens "
        f"for llm-compressor). Perplexity: token perplexity, GPTQ protocol, seqlen {w['seqlen']}, first "
        f"{w['max_windows']} windows (WikiText-2 test; C4 docs 1000-1999). KL: mean KL(float32 || {compressed}) "
        f"over the same WikiText-2 tokens. Zero-shot: first {p['zero_shot']['limit']} examples (PIQA and "
        "HellaSwag acc_norm, ARC-Easy acc). "
    )


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
