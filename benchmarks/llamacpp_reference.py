"""llama.cpp as an outside reference for slimlm's generation speed, on the same GGUF model.

Writes `benchmarks/results/llamacpp_reference.{json,md}`. The embedded SmolLM2-135M GGUF file
(Q4_1 weights) is run by llama.cpp (`llama-cpp-python`, its own virtual environment made by
`benchmarks/peers/setup_llamacpp.sh`, same thread count) and by slimlm's runner on the float32
model that slimlm dequantizes from that same file, so both compute with the same weight values:
llama.cpp keeps them packed in 4 bits (and quantizes the activations of its matmuls to 8 bits),
slimlm multiplies dense float32 matrices. Same prompt (the first `--prompt-tokens` tokens of the
embedded `pydoc` corpus), greedy decoding of `--new-tokens` tokens, batch 1, median of
`--repeats` runs. Reported: time to first token (prefill + first token), per-token decode
latency, tokens/s, the ratio slimlm / llama.cpp of each, and how many of the greedy tokens agree.

    python benchmarks/llamacpp_reference.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VENV_PYTHON = HERE / "peers" / ".venv-llamacpp" / "bin" / "python"

# Runs inside the llama.cpp virtual environment (no slimlm there): argv = gguf, request json, out json.
LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
gguf, request, out = sys.argv[1:4]
req = json.load(open(request))
llm = Llama(model_path=gguf, n_ctx=req["context"], n_threads=req["threads"], n_batch=512, verbose=False)
runs = []
for _ in range(req["repeats"]):
    llm.reset()  # else generate() finds the prompt already evaluated (prefix reuse) and skips the prefill
    start = time.perf_counter()
    tokens, first = [], None
    # temp 0: llama.cpp's greedy sampler
    for token in llm.generate(req["prompt"], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
        if len(tokens) == req["new_tokens"]:
            break
    end = time.perf_counter()
    runs.append({"ttft_s": first - start, "decode_s": end - first, "tokens": tokens})
json.dump({"runs": runs, "version": __import__("llama_cpp").__version__}, open(out, "w"))
"""


def llamacpp_runs(gguf: str, prompt: list[int], args) -> dict:
    if not VENV_PYTHON.is_file():
        subprocess.run(["bash", str(HERE / "peers" / "setup_llamacpp.sh")], check=True)
    with tempfile.TemporaryDirectory() as directory:
        request, out, child = (Path(directory) / name for name in ("request.json", "out.json", "child.py"))
        request.write_text(json.dumps({"prompt": prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
                                       "threads": args.threads, "context": len(prompt) + args.new_tokens + 8}))
        child.write_text(LLAMA_CHILD)
        done = subprocess.run([str(VENV_PYTHON), str(child), gguf, str(request), str(out)], capture_output=True,
                              text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"llama.cpp run failed:\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def slimlm_runs(model, prompt: list[int], args) -> list[dict]:
    import time

    from slimlm.infer import generate_ids

    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = generate_ids(model, [prompt], args.new_tokens)
        total = time.perf_counter() - start
        ttft = result.stats.time_to_first_token_s
        runs.append({"ttft_s": ttft, "decode_s": total - ttft, "tokens": result.tokens[0]})
    return runs


def summary(engine: str, runs: list[dict], new_tokens: int) -> dict:
    ttft = statistics.median(r["ttft_s"] for r in runs)
    per_token = statistics.median(r["decode_s"] / (new_tokens - 1) for r in runs)
    total = statistics.median(r["ttft_s"] + r["decode_s"] for r in runs)
    return {"engine": engine, "ttft_s": ttft, "per_token_s": per_token, "tokens_per_s": new_tokens / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "llamacpp_reference"))
    args = parser.parse_args()

    import torch

    from slimlm.data.calibration import tokenize_corpus
    from slimlm.data.corpora import load_corpus
    from slimlm.models.loading import embedded_gguf_path, load_model
    from slimlm.results import library_versions, machine_info, markdown_table, utc_now, write_results

    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    prompt = tokenize_corpus(lm.tokenizer, load_corpus("pydoc", split="eval"))[:args.prompt_tokens].tolist()
    gguf = str(embedded_gguf_path("smollm2-135m"))
    ours = slimlm_runs(lm.model, prompt, args)
    theirs = llamacpp_runs(gguf, prompt, args)
    rows = [summary("slimlm runner, float32", ours, args.new_tokens),
            summary(f"llama.cpp {theirs['version']}, Q4_1", theirs["runs"], args.new_tokens)]
    ratio = {"engine": "slimlm / llama.cpp (time ratio; tokens/s ratio for the last column)",
             "ttft_s": rows[0]["ttft_s"] / rows[1]["ttft_s"], "per_token_s": rows[0]["per_token_s"] / rows[1]["per_token_s"],
             "tokens_per_s": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]}
    same = sum(a == b for a, b in zip(ours[0]["tokens"], theirs["runs"][0]["tokens"]))
    first_difference = next((i for i, (a, b) in enumerate(zip(ours[0]["tokens"], theirs["runs"][0]["tokens"]))
                             if a != b), None)
    command = shlex.join(["python", "benchmarks/llamacpp_reference.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "gguf": Path(gguf).name, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads, "rows": rows,
              "ratio": ratio, "greedy_tokens_equal": same, "first_differing_token": first_difference,
              "runs": {"slimlm": ours, "llama.cpp": theirs["runs"]}, "machine": machine_info(),
              "versions": {**library_versions(), "llama-cpp-python": theirs["version"]}, "date": utc_now(),
              "command": command}
    m = result["machine"]
    preamble = (f"# llama.cpp beside slimlm's generation: {result['gguf']}\n\nCommand: `{command}`  \nMachine: "
                f"{m['cpu']}, {m['cores']} cores, {args.threads} threads  \nDate: {result['date']}\n\n"
                + __doc__.split("\n\n")[1].replace("\n", " ") + "\n")
    table = (markdown_table([*rows, ratio]) + f"\n\nGreedy tokens equal: {same} of {args.new_tokens} (first "
             f"difference at token {first_difference}).\n")
    write_results(Path(args.out), [result], table, preamble=preamble)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
