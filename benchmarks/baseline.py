"""Baseline of the default model (SmolLM2-135M-Instruct, float32): quality, size, FLOPs, speed.

Writes `benchmarks/results/baseline.json` (full records) and `baseline.md` (readable tables).
Each section is saved to a progress file as soon as it finishes, so an interrupted run resumes
where it stopped (delete `benchmarks/results/.baseline.partial.json` to start over).

    python benchmarks/baseline.py --data-dir ../shared/data          # the full run (about an hour here)
    python benchmarks/baseline.py --data-dir ../shared/data --quick  # a few minutes, to check the script
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from slimlm.data.tasks import ZERO_SHOT_TASKS
from slimlm.eval.efficiency import (
    count_parameters,
    disk_bytes,
    flops_per_token,
    measure_latency,
    measure_peak_flops,
    memory_bytes,
    mfu,
)
from slimlm.eval.perplexity import perplexity
from slimlm.eval.zeroshot import evaluate_task
from slimlm.models.loading import load_model
from slimlm.results import atomic_write_text, library_versions, machine_info, markdown_table, utc_now, write_results

RESULTS = Path(__file__).resolve().parent / "results"

# (corpus, seqlen, max_windows): WikiText-2 at 2048 over every window is the GPTQ protocol; 512 over
# the first 40 windows is the short protocol that the peer-tool reference numbers use.
PERPLEXITY_RUNS = [("wikitext2", 2048, None), ("wikitext2", 512, 40), ("ptb", 2048, None), ("c4", 2048, None)]
QUICK_PERPLEXITY_RUNS = [("wikitext2", 512, 4), ("ptb", 512, 2), ("c4", 512, 2)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $SLIMLM_DATA)")
    parser.add_argument("--limit", type=int, default=500, help="first N examples of each zero-shot task")
    parser.add_argument("--quick", action="store_true", help="short protocols, to check the script")
    parser.add_argument("--out", default=str(RESULTS / "baseline"), help="output stem (.json and .md)")
    return parser.parse_args()


class Sections:
    """Finished sections, kept in a progress file so that a rerun skips them."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.done: dict[str, dict] = {} if fresh or not path.is_file() else json.loads(path.read_text())

    def run(self, key: str, compute) -> dict:
        if key not in self.done:
            start = time.perf_counter()
            result = compute()
            result["seconds"] = round(time.perf_counter() - start, 1)
            self.done[key] = result
            atomic_write_text(self.path, json.dumps(self.done, indent=1))
            print(f"[{utc_now()}] {key}: done in {result['seconds']} s", flush=True)
        return self.done[key]


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    out = Path(args.out)
    sections = Sections(out.parent / f".{out.name}.partial.json", fresh=False)
    runs = QUICK_PERPLEXITY_RUNS if args.quick else PERPLEXITY_RUNS
    limit = min(args.limit, 20) if args.quick else args.limit

    ppl = [
        sections.run(f"ppl/{corpus}/{seqlen}/{windows}",
                     lambda c=corpus, s=seqlen, w=windows: perplexity(model, tokenizer, c, s, w, args.data_dir).to_dict())
        for corpus, seqlen, windows in runs
    ]
    zero_shot = [
        sections.run(f"zeroshot/{task}/{limit}",
                     lambda t=task: _plain(evaluate_task(model, tokenizer, t, args.data_dir, limit, 16)))
        for task in ZERO_SHOT_TASKS
    ]
    size = sections.run("size", lambda: _size(model, loaded.source))
    speed = sections.run("speed", lambda: _speed(model, quick=args.quick))

    command = shlex.join(["python", "benchmarks/baseline.py", *sys.argv[1:]])
    record = {
        "model": args.model, "method": "none (float32 baseline)", "source": loaded.source,
        "perplexity": ppl, "zero_shot": zero_shot, "size": size, "speed": speed,
        "machine": machine_info(), "versions": library_versions(), "date": utc_now(), "command": command,
    }
    write_results(out, [record], _tables(record, limit), preamble=_preamble(record))
    print((out.with_suffix(".md")).read_text())


def _plain(result: dict) -> dict:
    return json.loads(json.dumps(result, default=str))


def _size(model, source: str) -> dict:
    flops = {context: flops_per_token(model, context).to_dict() for context in (512, 2048)}
    return {
        "parameters": count_parameters(model),
        "memory_bytes": memory_bytes(model),
        "disk_bytes_safetensors": disk_bytes(model),
        "disk_bytes_source_gguf": Path(source).stat().st_size if source.endswith(".gguf") else None,
        "flops_per_token": flops,
    }


def _speed(model, quick: bool) -> dict:
    peak = measure_peak_flops(size=1024, repeats=10)
    rows = []
    for batch in (1, 8):
        result = measure_latency(model, prompt_tokens=128, new_tokens=8 if quick else 32, batch=batch,
                                 repeats=1 if quick else 3)
        rows.append({**result.to_dict(), "prefill_mfu": mfu(result.prefill_flops_per_s, peak),
                     "decode_mfu": mfu(result.decode_flops_per_s, peak)})
    return {"peak_flops_per_s": peak, "peak_source": "best of 10 float32 1024x1024 matmuls", "rows": rows}


def _preamble(record: dict) -> str:
    machine = record["machine"]
    return (
        f"# Baseline: {record['model']} (float32)\n\n"
        f"Command: `{record['command']}`  \n"
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads; "
        f"torch {record['versions']['torch']}, transformers {record['versions']['transformers']}  \n"
        f"Date: {record['date']}  \nWeights: {record['source']}\n\n"
        "Perplexity is token perplexity with the GPTQ protocol (documents joined with a blank line, "
        "non-overlapping windows, remainder dropped); C4 is documents 1000-1999 of the local 2k validation "
        "sample, not the GPTQ C4 subset. Zero-shot metrics follow lm-evaluation-harness definitions "
        "(acc, length-normalised acc_norm), 0-shot. The `seconds` columns are the wall time each section took "
        "as run (other work may have shared the 2 cores), not speed measurements: the Speed section is."
    )


def _tables(record: dict, limit: int) -> str:
    ppl_rows = [{"corpus": r["corpus"], "seqlen": r["seqlen"], "windows": f"{r['windows']}/{r['total_windows']}",
                 "tokens": r["tokens_scored"], "ppl": r["ppl"], "seconds": r["seconds"]} for r in record["perplexity"]]
    zs_rows = [{"task": r["task"], "n": r["n"], "acc": r.get("acc"), "acc_stderr": r.get("acc_stderr"),
                "acc_norm": r.get("acc_norm"), "ppl": r.get("ppl"), "chance": r.get("chance"),
                "seconds": r["seconds"]} for r in record["zero_shot"]]
    size = record["size"]
    size_rows = [{"parameters": size["parameters"], "memory_bytes": size["memory_bytes"],
                  "disk_bytes_safetensors": size["disk_bytes_safetensors"],
                  "disk_bytes_source_gguf": size["disk_bytes_source_gguf"]}]
    flop_rows = [{"context": c, "prefill_flops_per_token": f["prefill"], "decode_flops_per_token": f["decode"]}
                 for c, f in size["flops_per_token"].items()]
    speed = record["speed"]
    speed_cols = ("batch", "prompt_tokens", "prefill_s", "prefill_tokens_per_s", "decode_s_per_token",
                  "decode_tokens_per_s", "prefill_mfu", "decode_mfu")
    return "\n".join([
        "## Perplexity\n", markdown_table(ppl_rows),
        f"## Zero-shot (first {limit} examples of each task, in file order)\n", markdown_table(zs_rows),
        "## Size\n", markdown_table(size_rows), markdown_table(flop_rows),
        f"## Speed (greedy, KV cache; peak {speed['peak_flops_per_s'] / 1e9:.1f} GFLOP/s: {speed['peak_source']})\n",
        markdown_table(speed["rows"], speed_cols),
    ])


if __name__ == "__main__":
    main()
