"""Compression speed and memory on SmolLM2-135M: each method's wall time against the forward-pass floor measured
in the same run, its peak RSS against the engine's memory estimate, and llm-compressor on the same configuration.

Writes `benchmarks/results/compression_speed.{json,md}`. Every job runs in its own process (its peak RSS is its
own, read right after compression, before the evaluation); finished jobs are kept in a progress file, so an
interrupted run resumes (delete `benchmarks/results/.compression_speed.partial.json` to start over).

    python benchmarks/compression_speed.py --data-dir ../shared/data            # everything (about 2 hours)
    python benchmarks/compression_speed.py --data-dir ../shared/data --quick    # minutes: checks the script

- The floor: one forward pass of the calibration tokens through the model the way every sequential method
  needs it (the inputs of the first block captured, then every block run once on its cached inputs, in
  calibration batches of 8 segments). Each method's ratio is its wall time over the floor, and, where the
  method's own math is timed separately (the per-layer seconds of GPTQ's and SparseGPT's solvers, Wanda's
  masks), over the floor plus that math.
- Peak RSS: the process's resident peak during the compression call (reset after loading the model, so it
  holds the model and the runtime but not the loading), against the engine's estimate for the recipe.
- The profile: cProfile of the compression call (its overhead is inside the wall time), the ten functions
  with the most time of their own.
- Quality: WikiText-2 perplexity (seqlen 512, first 40 windows), to show that a faster path gives the same
  result: GPTQ against GPTQ with every group collected on full block passes (the engine before the
  shortcuts), AWQ against AWQ searching on every calibration token (the reference code).
- `(upper-triangle Hessian)`: GPTQ with H accumulated as its upper triangle (3/4 of the multiply-adds), a
  speed-up measured and left out of the engine because it moves perplexity by more than 0.1%.
- The jobs run one after another in one run (not alternated): ratios between rows of one run are what to
  compare; absolute seconds vary from machine to machine.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import llmcompressor, run_child, start  # noqa: E402

G64 = {"bits": 4, "group_size": 64}
# name -> (stage, what the row is for); None is the floor
METHODS = {  # in the order they run: an interrupted run has the main rows first
    "floor": None,
    "GPTQ W4 g64": {"method": "gptq", **G64},
    "AWQ W4 g64": {"method": "awq", **G64},
    "SparseGPT 50%": {"method": "sparsegpt", "sparsity": 0.5},
    "Wanda 50%": {"method": "wanda", "sparsity": 0.5},
    "AWQ W4 g64 (search on every token)": {"method": "awq", "search_samples": None, **G64},
    "GPTQ W4 g64 (full block passes)": {"method": "gptq", **G64},
    "GPTQ W4 g64 (upper-triangle Hessian)": {"method": "gptq", **G64},
    "SmoothQuant W8A8": {"method": "smoothquant", "alpha": 0.5,
                         "activations": {"bits": 8, "granularity": "per_token", "symmetric": True}},
    "GPTQ W4 g64 act-order": {"method": "gptq", "act_order": True, **G64},
    "RTN W4 g64": {"method": "rtn", **G64},
    "OmniQuant W4 per-channel LWC 1 epoch": {"method": "omniquant", "bits": 4, "group_size": "channel",
                                             "lwc": True, "let": False, "epochs": 1},
}
# slimlm row -> the llm-compressor arguments of the same configuration
PEERS = {
    "GPTQ W4 g64": ["--scheme", "W4G64", "--algo", "gptq", "--asymmetric"],
    "AWQ W4 g64": ["--scheme", "W4G64", "--algo", "awq", "--asymmetric"],
    "SparseGPT 50%": ["--algo", "sparsegpt", "--sparsity", "0.5"],
    "Wanda 50%": ["--algo", "wanda", "--sparsity", "0.5"],
    "GPTQ W4 g64 act-order": ["--scheme", "W4G64", "--algo", "gptq", "--asymmetric", "--actorder", "static"],
    "SmoothQuant W8A8": ["--algo", "smoothquant"],
}
OWN_MATH = {"gptq", "sparsegpt", "wanda"}  # methods whose per-layer seconds time their math alone
CONFIGS = {"SmolLM2-135M": None}


def full_passes() -> None:
    """The engine without the shortcuts of slimlm.core.sequential: every group of a block collected on a full
    pass of the block, the next block's inputs from one more."""
    from slimlm.core import sequential

    sequential.BlockBranches.check = lambda self, block, inputs: (False, False, False)


def upper_triangle_hessian() -> None:
    """H accumulated as its upper triangle in 2 x 2 column blocks (3/4 of the multiply-adds), mirrored when read:
    measured, and left out of the engine because it changes H's rounding."""
    from slimlm.core import hessian

    def add_batch(self, inputs):
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.hessian.dtype)
        total = self.samples + x.shape[0]
        half = x.shape[1] // 2 if x.shape[1] >= 256 else x.shape[1]
        parts = [(slice(0, half), slice(0, half)), (slice(0, half), slice(half, None)),
                 (slice(half, None), slice(half, None))] if half < x.shape[1] else [(slice(None), slice(None))]
        for rows, columns in parts:
            self.hessian[rows, columns].addmm_(x[:, rows].T, x[:, columns], beta=self.samples / total,
                                               alpha=2 / total)
        self.samples, self.half = total, half

    result = hessian.HessianAccumulator.result

    def mirrored(self):
        if not getattr(self, "mirrored", False) and self.half < self.hessian.shape[0]:
            self.hessian[self.half:, :self.half] = self.hessian[:self.half, self.half:].T
        self.mirrored = True
        return result(self)

    hessian.HessianAccumulator.add_batch, hessian.HessianAccumulator.result = add_batch, mirrored


def run_job(spec: dict) -> dict:
    import cProfile
    import pstats

    import torch

    from slimlm.compress import compress, load_recipe
    from slimlm.compress.engine import estimate_memory
    from slimlm.eval.perplexity import perplexity
    from slimlm.models.loading import load_model

    torch.manual_seed(0)
    proto = spec["protocol"]
    lm = load_model("smollm2-135m")
    calibration = torch.load(spec["calibration"], weights_only=True)
    result = {"method": spec["method"], "threads": torch.get_num_threads(), "kernel": _kernel()}
    reset_peak_rss()  # the peak of the compression itself (with the loaded model), not of the loading
    if spec["stage"] is None:
        result["seconds"] = _floor(lm.model, calibration)
        result["peak_rss_bytes"] = peak_rss()
        return result
    if spec["method"].endswith("(full block passes)"):
        full_passes()
    if spec["method"].endswith("(upper-triangle Hessian)"):
        upper_triangle_hessian()
    recipe = load_recipe({"stages": [spec["stage"]], "calibration": {"batch_size": 8}})
    result["estimate_bytes"] = estimate_memory(lm.model, recipe).total
    profile = cProfile.Profile()
    start_time = time.perf_counter()
    profile.enable()
    report = compress(lm.model, recipe, calibration=calibration)
    profile.disable()
    result["seconds"] = time.perf_counter() - start_time
    result["peak_rss_bytes"] = peak_rss()
    if spec["stage"]["method"] in OWN_MATH:
        result["own_math_seconds"] = sum(layer.seconds for layer in report.layers)
    result["notes"] = report.notes
    stats = pstats.Stats(profile)
    ranked = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:10]
    result["profile"] = [{"function": _function_name(key), "calls": value[1], "own_seconds": round(value[2], 2),
                          "cumulative_seconds": round(value[3], 2)} for key, value in ranked]
    windows = proto["perplexity"]
    result["wikitext2_ppl"] = perplexity(lm.model, lm.tokenizer, "wikitext2", windows["seqlen"],
                                         windows["max_windows"], spec["data_dir"]).ppl
    return result


def reset_peak_rss() -> None:
    """Set the process's peak RSS (VmHWM) to its current RSS (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def peak_rss() -> int:
    """The process's peak RSS since the last reset, in bytes."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _floor(model, calibration) -> float:
    import torch

    from slimlm.core.blocks import capture_block_inputs, run_block
    from slimlm.models.adapter import ModelAdapter

    adapter = ModelAdapter(model)
    start_time = time.perf_counter()
    with torch.no_grad():
        inputs = capture_block_inputs(model, adapter, calibration, 8, torch.device("cpu"))
        for block in adapter.blocks:
            inputs = inputs.following(run_block(block, inputs))
    return time.perf_counter() - start_time


def _kernel() -> str:
    """Which matrix kernels PyTorch uses here: its CPU capability (AVX2, AVX512) and oneDNN/MKL builds."""
    import torch

    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, MKL {torch.backends.mkl.is_available()}"


def _function_name(key: tuple) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    parts = Path(filename).parts
    short = "/".join(parts[parts.index("site-packages") + 1:] if "site-packages" in parts else parts[-2:])
    return f"{short}:{line}({name})"


def main() -> None:
    def options(parser):
        parser.add_argument("--peer-methods", type=lambda text: [m.strip() for m in text.split(",")], default=None,
                            help="run llm-compressor only beside these rows (default: every row it has)")

    started = start(__doc__, CONFIGS, METHODS, "compression_speed", 32, run_job, options)
    if started is None:
        return
    args, proto, out, progress, tokens = started
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    rows = []
    for method in [m.strip() for m in args.methods.split(",")]:
        stage = METHODS[method]
        spec = {"protocol": proto, "data_dir": args.data_dir, "method": method, "stage": stage,
                "calibration": tokens["calib_pt"]}
        rows.append(progress.record(method, lambda s=spec: {**run_child(__file__, args.data_dir, s), "tool": "slimlm"}))
        if method in PEERS and not args.no_peer and (args.peer_methods is None or method in args.peer_methods):
            rows.append(progress.record(f"llm-compressor {method}", lambda m=method: _peer(tokens, m)))
    command = shlex.join(["python", "benchmarks/compression_speed.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "protocol": proto, "rows": _with_ratios(rows), "machine": machine_info(),
              "versions": library_versions(), "date": utc_now(), "command": command}
    write_results(out, [result], _tables(result["rows"]), preamble=_preamble(result))
    print(out.with_suffix(".md").read_text())


def _peer(tokens: dict, method: str) -> dict:
    peer = llmcompressor(tokens, PEERS[method])
    return {"method": method, "tool": "llm-compressor", "status": peer["status"],
            "seconds": peer.get("compression_seconds"),
            "peak_rss_bytes": peer.get("peak_rss_bytes"), "wikitext2_ppl": peer.get("ppl"),
            "error": (peer.get("error") or "")[:200] or None, "versions": peer.get("versions")}


def _with_ratios(rows: list[dict]) -> list[dict]:
    floor = next((r["seconds"] for r in rows if r["method"] == "floor"), None)
    ours = {r["method"]: r for r in rows if r["tool"] == "slimlm"}
    for row in rows:
        if row.get("status", "ok") != "ok":  # a failed peer's seconds time its failure
            continue
        if floor and row.get("seconds") and row["method"] != "floor":
            row["x_floor"] = row["seconds"] / floor
            if row.get("own_math_seconds") is not None:
                row["x_floor_plus_math"] = row["seconds"] / (floor + row["own_math_seconds"])
        mine = ours.get(row["method"])
        if row["tool"] == "llm-compressor" and mine and row.get("seconds"):
            row["slimlm_over_peer"] = mine["seconds"] / row["seconds"]
        if row.get("estimate_bytes"):
            row["rss_over_estimate"] = row["peak_rss_bytes"] / row["estimate_bytes"]
    return rows


def _preamble(result: dict) -> str:
    m, v, p = result["machine"], result["versions"], result["protocol"]
    c, w = p["calibration"], p["perplexity"]
    return (f"# Compression speed and memory: {result['model']}\n\nCommand: `{result['command']}`  \n"
            f"Machine: {m['cpu']}, {m['cores']} cores; torch {v['torch']}, transformers {v['transformers']}  \n"
            f"Date: {result['date']}\n\nCalibration: {c['samples']} x {c['seqlen']} tokens of {c['corpus']}, seed "
            f"{c['seed']}, batches of 8 segments (identical tokens for llm-compressor). Perplexity: WikiText-2, "
            f"seqlen {w['seqlen']}, first {w['max_windows']} windows. `x floor`: wall time over the forward-pass "
            "floor of the same run (see the script's docstring); `x floor+math`: over the floor plus the method's "
            "own per-layer math. `slimlm / llm-compressor`: slimlm's wall time over llm-compressor's on the same "
            "configuration. Jobs ran one after another in this run; seconds include cProfile's overhead for slimlm.\n")


def _tables(rows: list[dict]) -> str:
    from slimlm.results import markdown_table

    columns = ("method", "tool", "seconds", "x_floor", "x_floor_plus_math", "slimlm_over_peer", "wikitext2_ppl",
               "peak_rss_bytes", "estimate_bytes", "rss_over_estimate", "status")
    table = markdown_table(rows, columns)
    profiles = []
    for row in rows:
        if row.get("profile"):
            lines = "\n".join(f"| {p['function']} | {p['calls']} | {p['own_seconds']} | {p['cumulative_seconds']} |"
                              for p in row["profile"])
            profiles.append(f"### {row['method']}\n\n| function | calls | own s | cumulative s |\n|---|---|---|---|\n"
                            f"{lines}\n")
    kernels = sorted({row["kernel"] for row in rows if row.get("kernel")})
    return (table + "\n\nKernels: " + "; ".join(kernels)
            + "\n\n## Where the time goes (cProfile, top 10 by own time)\n\n" + "\n".join(profiles))


if __name__ == "__main__":
    main()
