"""slimlm's GGUF export checked by llama.cpp itself: quality, agreement with slimlm and decode speed.

Writes `benchmarks/results/gguf_export.{json,md}`. SmolLM2-135M (the embedded float32 model) is
quantized by slimlm with its GGUF presets (`slimlm.compress.presets`): `rtn-gguf-q4_0` (RTN 4-bit
symmetric group 32, llama.cpp's signed-max range rule), `gptq-gguf-q4_0` (the same grid by GPTQ with
llama.cpp's importance-weighted scales, relative_dampening 1, act-order and static groups),
`awq-gguf-q4_0` (AWQ 4-bit symmetric group 32, balanced grid), all exported to Q4_0, and
`rtn-gguf-q8_0` (RTN 8-bit symmetric group 32) exported to Q8_0; each file is written by
`slimlm.export.gguf.export_gguf` (token embedding Q8_0, norms F32). GPTQ and AWQ calibrate
on `calibration_samples(tokenizer, "c4", 128, 512, seed 0)`. The float model is also written as F32,
and llama.cpp's own Q4_0 is made from that file by llama.cpp's `llama-quantize` tool: plain, and with
an importance matrix that `llama-imatrix` computes on the same calibration text (the 128 calibration
windows detokenized and concatenated, re-tokenized by llama.cpp into 512-token chunks), once with
llama-quantize's own Q4_0 mixture (which then stores `ffn_down` of the first n_layer/8 layers as Q4_1)
and once with every linear Q4_0 (`--tensor-type ffn_down=q4_0`: slimlm's tensor types and file size);
llama.cpp's Q4_K_M mixture of the float model (no importance matrix) is the usual peer (a larger file:
K-quants where a row is a multiple of 256 wide, llama.cpp's fallbacks elsewhere).
Both tools are built by `benchmarks/peers/setup_llamacpp_tools.sh` from the llama.cpp that
llama-cpp-python vendors. AWQ is not in the default `--configs`: on a 2-core CPU without AMX it runs
for over 30 minutes (`--configs float32,awq-gguf-q4_0,...` adds it; `--work-dir DIR --reuse` keeps
finished configs across runs).

Every GGUF file then runs in llama.cpp (`llama-cpp-python` in its own virtual environment, built by
`benchmarks/peers/setup_llamacpp.sh`), in one child process:
- WikiText-2 perplexity from llama.cpp's logits on the same token windows slimlm's protocol scores
  (`--windows` windows of `--seqlen` tokens of the test split, each evaluated from an empty context,
  tokens 2..seqlen scored, as `slimlm.eval.perplexity` does);
- logits on a prompt (the first `--prompt-tokens` tokens of the embedded pydoc corpus) against
  slimlm's reference path on the same weights: max and mean absolute difference;
- greedy decoding of `--new-tokens` tokens: how many agree with slimlm's greedy tokens;
- decode tokens/s against llama.cpp's own Q4_0 (plain), in alternating runs within the process
  (medians of `--repeats` runs, `--threads` threads); only the ratio is reported.
slimlm's perplexity of the same weights is computed by slimlm (reference path, float32); for the
llama.cpp rows slimlm reads those GGUF files back (dequantized by transformers' GGUF loader).

    flock /tmp/slimlm-bench.lock python benchmarks/gguf_export.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pickle
import re
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
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

request, out = sys.argv[1:3]
req = json.load(open(request))
result = {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(), "files": {}}

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

TOOLS = HERE / "peers" / "llamacpp-tools" / "bin"
# name -> (slimlm preset or None for the float model, GGUF ftype of the export)
CONFIGS = {
    "float32": (None, "f32"),
    "rtn-gguf-q4_0": ("rtn-gguf-q4_0", "q4_0"),
    "gptq-gguf-q4_0": ("gptq-gguf-q4_0", "q4_0"),
    "awq-gguf-q4_0": ("awq-gguf-q4_0", "q4_0"),
    "rtn-gguf-q8_0": ("rtn-gguf-q8_0", "q8_0"),
}
OWN, OWN_IMATRIX, OWN_IMATRIX_EQUAL = "llama.cpp Q4_0", "llama.cpp Q4_0 imatrix", "llama.cpp Q4_0 imatrix, all Q4_0"
OWN_K = "llama.cpp Q4_K_M"  # the usual peer: llama-quantize's K-quant mixture (larger; per-tensor fallbacks)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--configs", default=",".join(n for n in CONFIGS if n != "awq-gguf-q4_0"),
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
    parser.add_argument("--no-imatrix", action="store_true", help="skip llama.cpp's Q4_0 with an importance matrix")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the configs an earlier run finished in --work-dir (GGUF file and slimlm results)")
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


def build(name: str, preset: str | None, base, calibration):
    """A copy of the float model with the preset applied (timed), and the recipe that was applied."""
    from slimlm.compress import compress
    from slimlm.compress.presets import PRESETS

    model, seconds = copy.deepcopy(base), 0.0
    if preset is None:
        return model, seconds, None
    recipe = {**copy.deepcopy(PRESETS[preset]), "calibration": {"batch_size": 8}}
    start = time.perf_counter()
    compress(model, recipe, calibration=calibration)
    return model, time.perf_counter() - start, recipe


def recipe_text(recipe: dict | None) -> str:
    if recipe is None:
        return "float"
    return "; ".join(", ".join(f"{k}={v}" for k, v in stage.items()) for stage in recipe["stages"])


def run_tool(command: list[str], log: Path) -> str:
    """Run a llama.cpp tool, keep its output in `log`, fail loudly."""
    print("$ " + shlex.join(command), flush=True)
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    log.write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + "\n" + done.stderr


def llamacpp_quantize(f32: Path, work: Path, calibration, tokenizer, args) -> dict:
    """llama.cpp's own Q4_0 files (llama-quantize, with and without llama-imatrix's importance matrix)."""


    if not (TOOLS / "llama-quantize").is_file() or not (TOOLS / "llama-imatrix").is_file():
        subprocess.run(["bash", str(HERE / "peers" / "setup_llamacpp_tools.sh")], check=True)
    quantize, imatrix = str(TOOLS / "llama-quantize"), str(TOOLS / "llama-imatrix")
    threads = str(args.torch_threads)
    made = {}
    plain = work / "llamacpp-q4_0.gguf"
    command = [quantize, str(f32), str(plain), "Q4_0", threads]
    run_tool(command, work / "llama-quantize.log")
    made[OWN] = {"path": plain, "command": shlex.join(["llama-quantize", f32.name, plain.name, "Q4_0", threads])}
    k_quant = work / "llamacpp-q4_k_m.gguf"
    run_tool([quantize, str(f32), str(k_quant), "Q4_K_M", threads], work / "llama-quantize-q4_k_m.log")
    made[OWN_K] = {"path": k_quant,
                   "command": shlex.join(["llama-quantize", f32.name, k_quant.name, "Q4_K_M", threads])}
    if args.no_imatrix:
        return made
    text = work / "calibration.txt"  # the calibration windows, detokenized and concatenated
    text.write_text("".join(tokenizer.decode(window.tolist()) for window in calibration), encoding="utf-8")
    matrix = work / "imatrix.gguf"
    command = [imatrix, "-m", str(f32), "-f", str(text), "-c", str(args.calib_seqlen), "-b", str(args.calib_seqlen),
               "--chunks", str(len(calibration)), "-t", threads, "-o", str(matrix)]
    log = run_tool(command, work / "llama-imatrix.log")
    chunks = re.findall(r"computing over (\d+) chunks", log)
    about = {"imatrix_command": shlex.join(["llama-imatrix", "-m", f32.name, "-f", text.name, *command[5:-2],
                                           "-o", matrix.name]),
             "imatrix_chunks": int(chunks[-1]) if chunks else None,
             "calibration_text_chars": len(text.read_text(encoding="utf-8")),
             "calibration_text_sha256": hashlib.sha256(text.read_bytes()).hexdigest()}
    # With an importance matrix llama-quantize's Q4_0 mixture stores ffn_down of the first n_layer/8 layers as
    # Q4_1 (a slightly larger file); the second file keeps every linear Q4_0, the size of slimlm's Q4_0 files.
    for name, extra, stem in ((OWN_IMATRIX, [], "imatrix"), (OWN_IMATRIX_EQUAL, ["--tensor-type", "ffn_down=q4_0"],
                                                             "imatrix-all-q4_0")):
        quantized = work / f"llamacpp-q4_0-{stem}.gguf"
        run_tool([quantize, "--imatrix", str(matrix), *extra, str(f32), str(quantized), "Q4_0", threads],
                 work / f"llama-quantize-{stem}.log")
        made[name] = {"path": quantized, **about, "command": shlex.join(
            ["llama-quantize", "--imatrix", matrix.name, *extra, f32.name, quantized.name, "Q4_0", threads])}
    return made


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
    ours, exports, files, recipes = {}, {}, {}, {}
    for name in ["float32", *(n for n in names if n != "float32")]:
        preset, ftype = CONFIGS[name]
        path, cache = work / f"{name}.gguf", work / f"{name}.slimlm.pkl"
        if args.reuse and path.is_file() and cache.is_file():  # a finished config of an interrupted run
            ours[name], exports[name], recipes[name] = pickle.loads(cache.read_bytes())
        else:
            model, seconds, recipe = build(name, preset, lm.model, calibration)
            result = export_gguf(model, tokenizer, path, ftype=ftype, overwrite=True)
            exports[name] = {**result.summary(), "compression_seconds": seconds}
            ours[name] = slimlm_side(name, model, tokenizer, windows, prompt, args)
            recipes[name] = {"preset": preset, "recipe": recipe}
            cache.write_bytes(pickle.dumps((ours[name], exports[name], recipes[name])))
            del model
        files[name] = path
        print(f"[{utc_now()}] {name}: exported {path.stat().st_size} bytes, slimlm ppl computed", flush=True)
    made = llamacpp_quantize(files["float32"], work, calibration, tokenizer, args)
    print(f"[{utc_now()}] llama.cpp quantized: {', '.join(made)}", flush=True)
    for name, own in made.items():
        own_model = load_model(str(own["path"])).model  # llama.cpp's weights, read back by slimlm
        ours[name] = slimlm_side(name, own_model, tokenizer, windows, prompt, args)
        files[name] = own["path"]
        recipes[name] = {k: v for k, v in own.items() if k != "path"}
        del own_model
    logits = {name: work / (re.sub(r"[^A-Za-z0-9.-]+", "_", name) + ".logits.npy") for name in files}
    speed_reference = str(made[OWN]["path"])
    request = {"threads": args.threads, "seqlen": args.seqlen, "windows": windows.tolist(), "prompt": prompt,
               "new_tokens": args.new_tokens, "repeats": args.repeats, "speed_reference": speed_reference,
               "files": {str(files[n]): str(logits[n]) for n in files}}
    theirs = run_llamacpp(request, work)
    reference_speed = statistics.median(theirs["files"][speed_reference]["decode_s"])
    rows = []
    for name, path in files.items():
        record = theirs["files"][str(path)]
        speed = reference_speed / statistics.median(record["decode_s"])
        by_llamacpp = name in made
        row = {"config": name, "written_by": "llama.cpp llama-quantize" if by_llamacpp else "slimlm export_gguf",
               "recipe": recipes[name]["command"] if by_llamacpp else recipe_text(recipes[name]["recipe"]),
               "recipe_detail": recipes[name], "gguf_types": gguf_types(path), "file_bytes": path.stat().st_size,
               **compare(ours[name], record, logits[name]), "decode_speed_vs_llamacpp_q4_0": speed,
               "decode_s_runs": record["decode_s"]}
        if name in exports:
            row["export"] = exports[name]
        row["slimlm_paths"] = ours[name]["slimlm_paths"]
        rows.append(row)
    command = shlex.join(["python", "benchmarks/gguf_export.py", *sys.argv[1:]])
    imatrix = made.get(OWN_IMATRIX)  # the same matrix for both imatrix rows
    result = {"model": "smollm2-135m", "rows": rows,
              "protocol": {"windows": len(windows), "seqlen": args.seqlen, "scored_tokens_per_row": rows[0]["scored_tokens"],
                           "calibration": {"corpus": args.calib_corpus, "samples": args.calib_samples,
                                           "seqlen": args.calib_seqlen, "seed": 0},
                           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                           "llamacpp_threads": args.threads, "torch_threads": args.torch_threads,
                           "imatrix": "not run (--no-imatrix)" if imatrix is None else (
                               f"`{imatrix['imatrix_command']}` on the {args.calib_samples} calibration windows "
                               f"detokenized and concatenated ({imatrix['calibration_text_chars']} characters), "
                               f"re-tokenized by llama.cpp: {imatrix['imatrix_chunks']} chunks of {args.calib_seqlen} "
                               f"tokens")},
              "llamacpp": {"version": theirs["version"], "system_info": theirs["system_info"],
                           "build": "benchmarks/peers/setup_llamacpp.sh (GGML_NATIVE=OFF, AVX2/FMA/F16C, no AVX-512)",
                           "tools": "llama-quantize and llama-imatrix from the same vendored llama.cpp, built by "
                                    "benchmarks/peers/setup_llamacpp_tools.sh (same flags)"},
              "machine": machine_info(), "versions": {**library_versions(), "llama-cpp-python": theirs["version"]},
              "date": utc_now(), "command": command}
    write_results(Path(args.out), [result], _table(rows), preamble=_preamble(result))
    print(Path(args.out).with_suffix(".md").read_text())


def _table(rows: list[dict]) -> str:
    columns = ("config", "written_by", "recipe", "file_bytes", "llamacpp_ppl", "slimlm_ppl", "ppl_ratio", "greedy_agree",
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
            f"llama.cpp's own Q4_0: `llama-quantize` ({l['tools']}); importance matrix: {p['imatrix']}.\n")


if __name__ == "__main__":
    main()
