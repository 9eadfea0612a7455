"""slimlm's GGUF export checked by llama.cpp itself: quality, agreement with slimlm and decode speed.

Writes `benchmarks/results/gguf_export.{json,md}`. SmolLM2-135M (the embedded float32 model) is
quantized by slimlm (RTN and GPTQ at 4-bit symmetric group 32, exported to Q4_0; RTN 8-bit
symmetric group 32, exported to Q8_0) and written with `slimlm.export.gguf.export_gguf` (token
embedding Q8_0, norms F32). The float model is also written as F32, and llama.cpp's own Q4_0 is
made from that file by `llama_model_quantize` (llama-quantize's code, no importance matrix).

Every GGUF file then runs in llama.cpp (`llama-cpp-python` in its own virtual environment, built by
`benchmarks/peers/setup_llamacpp.sh`), in one child process:
- WikiText-2 perplexity from llama.cpp's logits on the same token windows slimlm's protocol scores
  (`--windows` windows of `--seqlen` tokens of the test split, each evaluated from an empty context,
  tokens 2..seqlen scored, as `slimlm.eval.perplexity` does);
- logits on a prompt (the first `--prompt-tokens` tokens of the embedded pydoc corpus) against
  slimlm's reference path on the same weights: max and mean absolute difference;
- greedy decoding of `--new-tokens` tokens: how many agree with slimlm's greedy tokens;
- decode tokens/s against llama.cpp's own Q4_0, in alternating runs within the process (medians of
  `--repeats` runs, `--threads` threads); only the ratio is reported.
slimlm's perplexity of the same weights is computed by slimlm (reference path, float32); for the
llama.cpp Q4_0 row slimlm reads that GGUF file back (dequantized by transformers' GGUF loader).

    python benchmarks/gguf_export.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VENV_PYTHON = HERE / "peers" / ".venv-llamacpp" / "bin" / "python"

# Runs inside the llama.cpp virtual environment (no slimlm, no torch): argv = request json, out json.
LLAMA_CHILD = r"""
import ctypes, json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

request, out = sys.argv[1:3]
req = json.load(open(request))
result = {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(), "files": {}}

if req.get("quantize"):
    source, target = req["quantize"]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = req["threads"]
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize failed with {status}")

def load(path, context):
    return Llama(model_path=path, n_ctx=context, n_batch=context, n_ubatch=context, n_threads=req["threads"],
                 logits_all=True, verbose=False)

def window_nll(llm, window):
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum()), len(window) - 1

def greedy(llm, prompt, count):
    llm.reset()
    start, first, tokens = time.perf_counter(), None, []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
        if len(tokens) == count:
            break
    return tokens, time.perf_counter() - first

context = max(req["seqlen"], len(req["prompt"]) + req["new_tokens"] + 8)
models = {path: load(path, context) for path in req["files"]}
for path, llm in models.items():
    nll, scored = 0.0, 0
    for window in req["windows"]:
        value, count = window_nll(llm, window)
        nll, scored = nll + value, scored + count
    llm.reset()
    llm.eval(req["prompt"])
    np.save(req["files"][path], np.asarray(llm.scores[: len(req["prompt"])], dtype=np.float32))
    tokens, _ = greedy(llm, req["prompt"], req["new_tokens"])
    result["files"][path] = {"nll": nll / scored, "scored": scored, "greedy": tokens, "decode_s": []}
reference = req["speed_reference"]
for _ in range(req["repeats"]):  # alternate: reference, then every other file, repeat
    for path, llm in models.items():
        _, seconds = greedy(llm, req["prompt"], req["new_tokens"])
        result["files"][path]["decode_s"].append(seconds)
json.dump(result, open(out, "w"))
"""

CONFIGS = {
    "float32": (None, "f32"),
    "rtn-w4g32-sym": ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, "q4_0"),
    "gptq-w4g32-sym": ({"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}, "q4_0"),
    "awq-w4g32-sym": ({"method": "awq", "bits": 4, "group_size": 32, "symmetric": True}, "q4_0"),
    "rtn-w8g32-sym": ({"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}, "q8_0"),
}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--configs", default="float32,rtn-w4g32-sym,gptq-w4g32-sym,rtn-w8g32-sym",
                        help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--windows", type=int, default=20, help="WikiText-2 windows")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib-corpus", default="c4")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--torch-threads", type=int, default=2, help="slimlm's threads (compression, perplexity)")
    parser.add_argument("--work-dir", help="where the GGUF files go (default: a temporary directory)")
    parser.add_argument("--out", default=str(RESULTS / "gguf_export"))
    return parser.parse_args()


def slimlm_side(name: str, model, tokenizer, windows, prompt: list[int], args) -> dict:
    """slimlm's perplexity on the windows, prompt logits and greedy tokens (reference path, float32)."""
    import torch

    from slimlm.eval.perplexity import window_logits, window_nll

    nll, scored = 0.0, 0
    for window in windows:
        values = window_nll(window_logits(model, window), window)
        nll, scored = nll + values.double().sum().item(), scored + values.numel()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0].float()
        ids = list(prompt)
        for _ in range(args.new_tokens):  # greedy without a cache: the same exact path every step
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    paths = sorted({getattr(m, "last_path", None) for m in model.modules()} - {None})
    return {"config": name, "slimlm_nll": nll / scored, "slimlm_scored": scored, "logits": logits.numpy(),
            "greedy": ids[len(prompt):], "slimlm_paths": paths}


def build(name: str, stage: dict | None, base, calibration):
    """A copy of the float model with the config's stage applied (timed)."""
    from slimlm.compress import compress

    model, seconds = copy.deepcopy(base), 0.0
    if stage is not None:
        start = time.perf_counter()
        compress(model, {"stages": [stage], "calibration": {"batch_size": 8}}, calibration=calibration)
        seconds = time.perf_counter() - start
    return model, seconds


def run_llamacpp(request: dict, work: Path) -> dict:
    if not VENV_PYTHON.is_file():
        subprocess.run(["bash", str(HERE / "peers" / "setup_llamacpp.sh")], check=True)
    (work / "request.json").write_text(json.dumps(request))
    (work / "child.py").write_text(LLAMA_CHILD)
    done = subprocess.run([str(VENV_PYTHON), str(work / "child.py"), str(work / "request.json"),
                           str(work / "out.json")], check=False, capture_output=True, text=True)
    if done.returncode != 0 or not (work / "out.json").is_file():
        raise RuntimeError(f"llama.cpp run failed:\n{done.stderr[-3000:]}")
    return json.loads((work / "out.json").read_text())


def gguf_types(path: Path) -> dict:
    from collections import Counter

    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def compare(ours: dict, theirs: dict, logits_path: Path) -> dict:
    import math

    import numpy as np

    llama_logits = np.load(logits_path)
    difference = np.abs(llama_logits.astype(np.float64) - ours["logits"].astype(np.float64))
    agree = sum(a == b for a, b in zip(ours["greedy"], theirs["greedy"]))
    first = next((i for i, (a, b) in enumerate(zip(ours["greedy"], theirs["greedy"])) if a != b), None)
    return {"llamacpp_ppl": math.exp(theirs["nll"]), "slimlm_ppl": math.exp(ours["slimlm_nll"]),
            "ppl_ratio": math.exp(theirs["nll"] - ours["slimlm_nll"]), "scored_tokens": theirs["scored"],
            "greedy_agree": agree, "first_greedy_difference": first, "logit_max_abs_diff": float(difference.max()),
            "logit_mean_abs_diff": float(difference.mean())}


def main() -> None:
    args = parse_arguments()
    import torch

    from slimlm.data.calibration import calibration_samples, tokenize_corpus
    from slimlm.data.corpora import load_corpus
    from slimlm.eval.perplexity import token_windows
    from slimlm.export.gguf import export_gguf
    from slimlm.models.loading import load_model
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    torch.set_num_threads(args.torch_threads)
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or "float32" not in names:
        raise SystemExit(f"--configs must include float32 (for llama.cpp's own Q4_0); unknown: {unknown}")
    lm = load_model("smollm2-135m")
    tokenizer = lm.tokenizer
    windows = token_windows(tokenize_corpus(tokenizer, load_corpus("wikitext2", "eval", args.data_dir)),
                            args.seqlen, args.windows)
    prompt = tokenize_corpus(tokenizer, load_corpus("pydoc", split="eval"))[: args.prompt_tokens].tolist()
    calibration = calibration_samples(tokenizer, args.calib_corpus, args.calib_samples, args.calib_seqlen, 0,
                                      args.data_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="slimlm-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    ours, exports, files = {}, {}, {}
    for name in names:
        stage, ftype = CONFIGS[name]
        model, seconds = build(name, stage, lm.model, calibration)
        path = work / f"{name}.gguf"
        result = export_gguf(model, tokenizer, path, ftype=ftype, overwrite=True)
        exports[name] = {**result.summary(), "compression_seconds": seconds}
        ours[name] = slimlm_side(name, model, tokenizer, windows, prompt, args)
        files[name] = path
        print(f"[{utc_now()}] {name}: exported {result.bytes} bytes, slimlm ppl computed", flush=True)
        del model
    own = work / "llamacpp-q4_0.gguf"
    request = {"quantize": [str(files["float32"]), str(own)], "threads": args.threads, "seqlen": args.seqlen,
               "windows": windows.tolist(), "prompt": prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
               "speed_reference": str(own),
               "files": {str(p): str(work / f"{n}.logits.npy") for n, p in [*files.items(), ("llamacpp", own)]}}
    theirs = run_llamacpp(request, work)
    own_model = load_model(str(own)).model  # llama.cpp's Q4_0 weights, read back by slimlm
    ours["llama.cpp Q4_0"] = slimlm_side("llama.cpp Q4_0", own_model, tokenizer, windows, prompt, args)
    files["llama.cpp Q4_0"] = own
    reference_speed = statistics.median(theirs["files"][str(own)]["decode_s"])
    rows = []
    for name, path in files.items():
        record = theirs["files"][str(path)]
        speed = reference_speed / statistics.median(record["decode_s"])
        logits = work / (("llamacpp" if name == "llama.cpp Q4_0" else name) + ".logits.npy")
        row = {"config": name, "written_by": "llama.cpp llama_model_quantize" if name == "llama.cpp Q4_0"
               else "slimlm export_gguf", "gguf_types": gguf_types(path), "file_bytes": path.stat().st_size,
               **compare(ours[name], record, logits), "decode_speed_vs_llamacpp_q4_0": speed,
               "decode_s_runs": record["decode_s"]}
        if name in exports:
            row["export"] = exports[name]
        row["slimlm_paths"] = ours[name]["slimlm_paths"]
        rows.append(row)
    command = shlex.join(["python", "benchmarks/gguf_export.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "rows": rows,
              "protocol": {"windows": len(windows), "seqlen": args.seqlen, "scored_tokens_per_row": rows[0]["scored_tokens"],
                           "calibration": {"corpus": args.calib_corpus, "samples": args.calib_samples,
                                           "seqlen": args.calib_seqlen, "seed": 0},
                           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                           "llamacpp_threads": args.threads, "torch_threads": args.torch_threads,
                           "imatrix": "not run: llama-cpp-python exposes llama_model_quantize (which accepts an "
                                      "importance matrix) but not llama-imatrix, which computes one"},
              "llamacpp": {"version": theirs["version"], "system_info": theirs["system_info"],
                           "build": "benchmarks/peers/setup_llamacpp.sh (GGML_NATIVE=OFF, AVX2/FMA/F16C, no AVX-512)"},
              "machine": machine_info(), "versions": {**library_versions(), "llama-cpp-python": theirs["version"]},
              "date": utc_now(), "command": command}
    write_results(Path(args.out), [result], _table(rows), preamble=_preamble(result))
    print(Path(args.out).with_suffix(".md").read_text())


def _table(rows: list[dict]) -> str:
    columns = ("config", "written_by", "file_bytes", "llamacpp_ppl", "slimlm_ppl", "ppl_ratio", "greedy_agree",
               "logit_max_abs_diff", "logit_mean_abs_diff", "decode_speed_vs_llamacpp_q4_0")
    from slimlm.results import markdown_table

    table = markdown_table([{k: r[k] for k in columns} for r in rows], columns)
    types = "\n".join(f"- {r['config']}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["gguf_types"].items()))
                      + (f"; storage {r['export']['by_storage']}" if "export" in r else "") for r in rows)
    return table + "\n\nTensor types per file:\n\n" + types + "\n"


def _preamble(result: dict) -> str:
    m, p, l = result["machine"], result["protocol"], result["llamacpp"]
    c = p["calibration"]
    return (f"# slimlm's GGUF export in llama.cpp: {result['model']}\n\nCommand: `{result['command']}`  \n"
            f"Machine: {m['cpu']}, {m['cores']} cores  \nDate: {result['date']}  \nllama.cpp: llama-cpp-python "
            f"{l['version']}, {l['build']}; system info `{l['system_info'].strip()}`\n\n"
            f"Perplexity: WikiText-2 test, {p['windows']} windows x {p['seqlen']} tokens ({p['scored_tokens_per_row']} "
            f"tokens scored), from llama.cpp's logits (`llamacpp_ppl`) and from slimlm's reference path on the same "
            f"weights (`slimlm_ppl`). Calibration (GPTQ/AWQ): {c['samples']} x {c['seqlen']} tokens of {c['corpus']}, "
            f"seed {c['seed']}. Prompt: {p['prompt_tokens']} tokens; logit differences over all prompt positions; "
            f"greedy agreement over {p['new_tokens']} tokens. Decode speed: llama.cpp tokens/s of each file divided by "
            f"llama.cpp's own Q4_0, medians of {p['repeats']} alternating runs, {p['llamacpp_threads']} thread(s). "
            f"Importance matrix: {p['imatrix']}.\n")


if __name__ == "__main__":
    main()
