"""Low-rank factorization of SmolLM2-135M: SVD, ASVD, whitened ASVD (SVD-LLM) and LPLR at 10/20/30% fewer
parameters beside the structured-pruning rows of `pruning.json`; LASER's kept reductions; LoRC and EoRA
error compensation on GPTQ W3 g64, RTN W4 per channel and SparseGPT 2:4.

Writes `benchmarks/results/low_rank.{json,md}` and `low_rank.svg` (WikiText-2 perplexity against
parameters, every method a curve). Every job runs in its own process; finished jobs are kept in a progress
file, so an interrupted run resumes (delete `benchmarks/results/.low_rank.partial.json` to start over).

    python benchmarks/low_rank.py --data-dir ../shared/data            # everything
    python benchmarks/low_rank.py --data-dir ../shared/data --quick    # minutes: checks the script

Compensation rows: each base alone, then with LoRC and EoRA at rank 32 with 4-bit factors (one scale per rank
component); on GPTQ W3 g64 also with 3-bit factors (part `compensation-gptq`), and with bfloat16 factors and
EoRA at ranks 8, 16 and 64 (part `compensation-extra`). The results hold every finished row, whichever parts
ran this time. Factorization methods: `--methods` takes any of FACTORIZATION (the default leaves out
SVD-LLM's uniform ranks).

Protocol (recorded): the round-1 protocol (`_shared.protocol`): 128 x 512 C4 calibration tokens, WikiText-2
and C4 perplexity over 40 windows of 512, KL from float32, PIQA / ARC-Easy / HellaSwag on their first 200
examples. Levels are fractions of the *model's* parameters (embedding included, as in `pruning.json`); the
stages remove level / (decoder linears' share of the parameters) of the linears. Prefill latency: a
256-token prompt, the compressed model and the dense float32 model timed in alternating pairs in one
process (median of each, and their ratio). CPU budget choices, stated in the results: ASVD's sensitivity
sweep uses one 512-token calibration segment and the kept fractions 0.1, 0.3, 0.5, 0.7, 0.9 (the paper:
0.1 ... 0.9), for ASVD and whitened ASVD alike; LASER searches the MLP matrices of the last 8
blocks on 4 x 512 tokens of WikiText-2's validation split.
"""

from __future__ import annotations

import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import RESULTS_DIR, evaluate_quality, preamble, run_child, start  # noqa: E402

LEVELS = {"-10% params": 0.10, "-20% params": 0.20, "-30% params": 0.30}
ASVD_SWEEP = {"sensitivity_samples": 1, "ratio_candidates": [0.1, 0.3, 0.5, 0.7, 0.9]}
FACTORIZATION = {
    "SVD": lambda r: {"method": "svd", "parameter_reduction": r},
    "ASVD": lambda r: {"method": "asvd", "parameter_reduction": r, **ASVD_SWEEP},
    "ASVD whitened": lambda r: {"method": "asvd", "parameter_reduction": r, "scaling": "whitening", **ASVD_SWEEP},
    "LPLR 8-bit (SVD's bytes)": lambda r: {"method": "lplr", "bytes_reduction": r, "bits": 8},
    "SVD-LLM (whitened, uniform ranks)": lambda r: {"method": "asvd", "parameter_reduction": r,
                                                    "scaling": "whitening", "ranks": "uniform"},
}
DEFAULT_METHODS = ("SVD", "ASVD", "ASVD whitened", "LPLR 8-bit (SVD's bytes)")
PARTS = ("factorization", "compensation-gptq", "laser", "compensation", "compensation-extra")
BASES = {"GPTQ W3 g64": {"method": "gptq", "bits": 3, "group_size": 64},
         "RTN W4 per-channel": {"method": "rtn", "bits": 4, "group_size": "channel"},
         "SparseGPT 2:4": {"method": "sparsegpt", "pattern": "2:4"}}
# (method, rank, factor bits): float (bfloat16) factors, and 4-bit factors with one scale per rank component
CORRECTIONS = {"-": None, "EoRA r32 4-bit": ("eora", 32, 4), "LoRC r32 4-bit": ("lorc", 32, 4)}
# on GPTQ W3 g64 only: 3-bit factors (part compensation-gptq), float factors and other ranks (compensation-extra)
GPTQ_3BIT = {"EoRA r32 3-bit": ("eora", 32, 3), "LoRC r32 3-bit": ("lorc", 32, 3)}
GPTQ_EXTRA = {"LoRC r32": ("lorc", 32, None), "EoRA r32": ("eora", 32, None),
              **{f"EoRA r{r} 4-bit": ("eora", r, 4) for r in (8, 16, 64)}}
LASER = {"method": "laser", "blocks": [-8, -7, -6, -5, -4, -3, -2, -1], "matrices": ["gate", "up", "down"],
         "samples": 4}
STRUCTURED = ("LLM-Pruner", "SliceGPT", "SliceGPT one rotation", "FLAP", "FLAP uniform", "layer removal")


def linear_share(model_dir: str) -> float:
    """The decoder linears' share of the model's parameters, from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimlm.models.adapter import ModelAdapter, linear_shape

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    linears = sum(i * o for m in ModelAdapter(model).linear_layers().values() for i, o in [linear_shape(m)])
    return linears / sum(p.numel() for p in model.parameters())


def alternating_prefill(model, tokens: int, pairs: int) -> dict:
    """Prefill of a `tokens` prompt, this model and the dense float32 model alternately, medians and ratio."""
    import torch

    from slimlm.models.loading import load_model

    dense = load_model("smollm2-135m").model.eval()
    prompt = torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
    times = {"model": [], "dense": []}
    with torch.no_grad():
        for candidate in (model, dense):  # warm-up
            candidate(input_ids=prompt, use_cache=False)
        for _ in range(pairs):
            for key, candidate in (("model", model), ("dense", dense)):
                start = time.perf_counter()
                candidate(input_ids=prompt, use_cache=False)
                times[key].append(time.perf_counter() - start)
    model_ms, dense_ms = statistics.median(times["model"]) * 1000, statistics.median(times["dense"]) * 1000
    return {"prefill_ms": model_ms, "dense_prefill_ms": dense_ms, "prefill_speedup": dense_ms / model_ms}


def run_job(spec: dict) -> dict:
    """One job (in a child process): compress, save, evaluate, time."""
    import resource

    import torch

    from slimlm.compress import compress
    from slimlm.data.calibration import calibration_samples
    from slimlm.eval.efficiency import count_parameters, flops_per_token
    from slimlm.export.native import model_bytes, save
    from slimlm.models.loading import load_model

    proto, data_dir = spec["protocol"], spec["data_dir"]
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    model, tokenizer = lm.model.eval(), lm.tokenizer
    result, report = {"config": spec["config"], "method": spec["method"]}, None
    if spec["stages"]:
        if spec.get("laser_validation"):
            c = spec["laser_validation"]
            calibration = calibration_samples(tokenizer, "wikitext2", c["samples"], c["seqlen"], 0, data_dir)
        else:
            calibration = torch.load(spec["calibration"], weights_only=True)
        start = time.perf_counter()
        report = compress(model, {"stages": spec["stages"], "calibration": {"batch_size": 8}}, calibration=calibration)
        result["compression_seconds"] = time.perf_counter() - start
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["structure"] = [{k: v for k, v in s.items() if k not in ("ranks", "kept_fractions", "alphas")}
                               for s in report.structure]
        ranks = {k: v for s in report.structure for k, v in s.get("ranks", {}).items()}
        if ranks:
            result["mean_rank"] = sum(ranks.values()) / len(ranks)
        alphas = [a for s in report.structure for a in s.get("alphas", {}).values()]
        if alphas:
            result["alpha_counts"] = {str(a): alphas.count(a) for a in sorted(set(alphas))}
    result["parameters"] = count_parameters(model)
    result["linear_flops_per_token"] = flops_per_token(model, 256).linear
    with tempfile.TemporaryDirectory() as directory:
        result["disk_bytes"] = model_bytes(save(model, Path(directory) / "m", tokenizer))
    result.update(evaluate_quality(model, tokenizer, proto, data_dir))
    if spec.get("latency"):
        quick = spec.get("quick")
        result.update(alternating_prefill(model, 32 if quick else 256, 2 if quick else 7))
    return result


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--parts", default=",".join(PARTS),
                            help="comma-separated, in the order to run: " + ", ".join(PARTS))
        parser.add_argument("--reuse-committed", action="store_true",
                            help="count the rows of the committed results (--out's JSON) as done: resume a run "
                                 "whose progress file is gone; the rows keep their own dates and commands")
        parser.add_argument("--only-done", action="store_true",
                            help="run nothing: write the results of the rows already done")

    defaults = {name: FACTORIZATION[name] for name in DEFAULT_METHODS}  # --methods may name any of FACTORIZATION
    started = start(__doc__, LEVELS, defaults, "low_rank", 256, run_job, options)
    if started is None:
        return
    args, proto, out, progress, tokens = started
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    if args.reuse_committed:
        _seed_progress(progress, out.with_suffix(".json"))

    def only_done(key: str, compute) -> dict | None:
        return progress.done.get(key)

    if args.only_done:
        progress.record = only_done

    def child(config: str, method: str, stages: list, **extra) -> dict:
        spec = {"protocol": proto, "data_dir": args.data_dir, "config": config, "method": method, "stages": stages,
                "calibration": tokens["calib_pt"], "quick": args.quick, **extra}
        return run_child(__file__, args.data_dir, spec)

    levels = [c.strip() for c in args.configs.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    share = linear_share(tokens["model_dir"])
    rows = [progress.record("dense", lambda: child("dense", "-", [], latency=True))]
    rows = [row for row in rows if row is not None]

    def add(row: dict | None) -> None:
        if row is not None and all(row is not r for r in rows):  # None: --only-done and not done; a part may
            rows.append(row)                                      # repeat another's rows (compensation-gptq)

    def every_done_row() -> None:
        """Rows finished earlier (the progress file, or --reuse-committed) that the parts run now did not add:
        a run of some parts must not drop the others' rows from the results."""
        canonical = ([f"{level}/{method}" for level in LEVELS for method in FACTORIZATION] + ["LASER"]
                     + [f"{base}/{label}" for base in BASES for label in {**CORRECTIONS, **GPTQ_3BIT, **GPTQ_EXTRA}])
        for key in sorted(progress.done, key=lambda k: canonical.index(k) if k in canonical else len(canonical)):
            if key != "dense":
                add(progress.done[key])

    def write() -> None:
        every_done_row()
        command = shlex.join(["python", "benchmarks/low_rank.py", *sys.argv[1:]])
        result = {"model": "smollm2-135m", "protocol": {**proto, "asvd_sweep": ASVD_SWEEP, "laser": LASER},
                  "linear_share": share, "rows": rows, "machine": machine_info(), "versions": library_versions(),
                  "date": utc_now(), "command": command}
        structured = _structured_rows()
        write_results(out, [result], _tables(rows, structured), preamble=_preamble(result))
        out.with_suffix(".svg").write_text(_plot(rows, structured))

    def compensation(bases: tuple[str, ...] = tuple(BASES), corrections: dict = CORRECTIONS) -> None:
        for base in bases:
            stage = BASES[base]
            for label, correction in corrections.items():
                stages = [stage]
                if correction:
                    stages.append({"method": correction[0], "rank": correction[1], "factor_bits": correction[2]})
                add(progress.record(f"{base}/{label}", lambda b=base, m=label, s=stages: child(b, m, s)))
                write()

    def factorization() -> None:
        for level_name in levels:
            for method in methods:
                stage = FACTORIZATION[method](round(LEVELS[level_name] / share, 4))
                if stage.get("ranks", "sensitivity") == "sensitivity" and stage["method"] == "asvd":
                    slug = method.lower().replace(" ", "-")
                    stage["sensitivity_cache"] = str(Path(tempfile.gettempdir()) / f"slimlm-{out.name}-{slug}.json")
                add(progress.record(f"{level_name}/{method}",
                                            lambda c=level_name, m=method, s=stage: child(c, m, [s], latency=True)))
                write()

    def laser() -> None:
        validation = {"samples": 2 if args.quick else 4, "seqlen": 128 if args.quick else 512}
        add(progress.record("LASER", lambda: child("LASER", "LASER (late MLP)", [LASER],
                                                           laser_validation=validation, latency=True)))

    parts = {"factorization": factorization,
             "compensation-gptq": lambda: compensation(("GPTQ W3 g64",), {**CORRECTIONS, **GPTQ_3BIT}),
             "laser": laser, "compensation": compensation,
             "compensation-extra": lambda: compensation(("GPTQ W3 g64",), GPTQ_EXTRA)}
    for part in (p.strip() for p in args.parts.split(",")):
        parts[part]()
    write()
    print(out.with_suffix(".md").read_text())


def _seed_progress(progress, committed: Path) -> None:
    """Mark the rows of an earlier results file as done (key = config/method, as `main` records them)."""
    import json

    if not committed.is_file():
        return
    for row in json.loads(committed.read_text())[0]["rows"]:
        key = row["config"] if row["config"] in ("dense", "LASER") else f"{row['config']}/{row['method']}"
        progress.done.setdefault(key, {**row, "reused_from": committed.name})


def _structured_rows() -> list[dict]:
    """The structured-pruning rows of pruning.json (the same protocol), for the comparison table and plot."""
    import json

    path = RESULTS_DIR / "pruning.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())[0]["rows"]
    return [r for r in rows if r.get("method") in STRUCTURED and "params" in r.get("config", "")]


def _preamble(result: dict) -> str:
    return preamble("Low-rank factorization", result, "compressed") + (
        f"Levels are fractions of the model's parameters; the decoder linears hold {result['linear_share']:.3f} "
        "of them, so a stage removes level / that share of the linears' parameters. Prefill: a 256-token prompt, "
        "compressed and dense float32 models timed in alternating pairs in one process (7 pairs, medians). "
        "ASVD's sensitivity sweep (CPU budget): one 512-token calibration segment, kept fractions "
        "0.1/0.3/0.5/0.7/0.9; whitened ASVD (SVD-LLM's Cholesky whitening) uses the same search. Rows may come from "
        "several invocations of the script (resumed runs; `--only-done` writes them); compression_seconds of "
        "rows that ran beside the test suite are not clean timings. LASER: the MLP matrices of the last 8 "
        "blocks, rho in the paper's grid, scored on 4 x 512 tokens of WikiText-2's validation split. The "
        "structured rows are copied from `pruning.json` (same protocol; their prefill is a 128-token prompt "
        "timed in separate runs, so compare their speed only with each other).\n"
    )


def _tables(rows: list[dict], structured: list[dict]) -> str:
    from slimlm.results import markdown_table

    dense = next((r for r in rows if r["config"] == "dense"), None)
    factor = [r for r in rows if r["config"] in LEVELS or r["config"] == "dense"]
    compensation = [r for r in rows if r["config"] in BASES]
    for row in compensation:  # recovery of the base's Delta-ppl, and the extra bytes, against its base row
        base = next((b for b in compensation if b["config"] == row["config"] and b["method"] == "-"), None)
        if dense and base and row is not base:
            gap = base["wikitext2_ppl"] - dense["wikitext2_ppl"]
            row["delta_ppl_recovered"] = (base["wikitext2_ppl"] - row["wikitext2_ppl"]) / gap
            row["extra_bytes"] = (row["disk_bytes"] - base["disk_bytes"]) / base["disk_bytes"]
    quality = ("wikitext2_ppl", "c4_ppl", "kl_mean", "piqa_acc_norm", "arc_easy_acc", "hellaswag_acc_norm")
    text = "## Factorization at fewer parameters\n\n" + markdown_table(
        factor, ("config", "method", "parameters", *quality, "disk_bytes", "mean_rank", "linear_flops_per_token",
                 "prefill_ms", "dense_prefill_ms", "prefill_speedup", "compression_seconds"))
    if structured:
        text += "\n\n## Structured pruning at the same levels (from pruning.json)\n\n" + markdown_table(
            structured, ("config", "method", "parameters", *quality, "disk_bytes"))
    if compensation:
        text += "\n\n## Low-rank error compensation\n\n" + markdown_table(
            compensation, ("config", "method", *quality, "disk_bytes", "extra_bytes", "delta_ppl_recovered",
                           "compression_seconds"))
    laser = [r for r in rows if r["config"] == "LASER"]
    for row in laser:
        summary = next((s for s in row.get("structure", []) if s["method"] == "laser"), {})
        kept = [{"module": k["module"], "keep_fraction": k["keep_fraction"], "rank": k["rank"],
                 "single_ppl": k["single_ppl"], "composed_ppl": k["composed_ppl"], "stored": k.get("stored", "factors")}
                for k in summary.get("kept", [])]
        text += (f"\n\n## LASER\n\nSearched {summary.get('searched')} single reductions; validation perplexity "
                 f"{summary.get('baseline_ppl', float('nan')):.4f} -> {summary.get('final_ppl', float('nan')):.4f} "
                 f"with {len(kept)} kept.\n\n")
        text += markdown_table(laser, ("config", "method", "parameters", *quality, "disk_bytes", "prefill_speedup"))
        if kept:
            text += "\n\nKept reductions:\n\n" + markdown_table(kept)
    return text + "\n\nPlot: `low_rank.svg` (WikiText-2 perplexity against parameters).\n"


def _plot(rows: list[dict], structured: list[dict]) -> str:
    """A self-contained SVG: log WikiText-2 perplexity against parameters, one polyline per method."""
    import math

    series: dict[str, list[tuple[float, float]]] = {}
    dense = next((r for r in rows if r["config"] == "dense"), None)
    for row in [r for r in rows if r["config"] in LEVELS] + structured:
        if row.get("wikitext2_ppl") and row.get("parameters"):
            series.setdefault(row["method"], []).append((row["parameters"] / 1e6, row["wikitext2_ppl"]))
    if dense:
        for points in series.values():
            points.append((dense["parameters"] / 1e6, dense["wikitext2_ppl"]))
    points = [p for s in series.values() for p in s]
    if not points:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>"
    width, height, margin = 760, 460, 60
    xs, ys = [p[0] for p in points], [math.log10(p[1]) for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys) + 1e-9

    def at(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x0) / (x1 - x0 + 1e-9) * (width - 2 * margin - 150),
                height - margin - (math.log10(y) - y0) / (y1 - y0) * (height - 2 * margin))

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
              "#17becf"]
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
             "font-size='11'>", "<rect width='100%' height='100%' fill='white'/>",
             f"<text x='{width / 2 - 150}' y='20' font-size='14'>SmolLM2-135M: WikiText-2 ppl (log) "
             "vs parameters</text>"]
    for tick in range(math.floor(y0), math.ceil(y1) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** tick
            if y0 <= math.log10(value) <= y1:
                _, y = at(x0, value)
                parts.append(f"<line x1='{margin}' x2='{width - margin - 150}' y1='{y:.1f}' y2='{y:.1f}' "
                             f"stroke='#ddd'/><text x='5' y='{y + 4:.1f}'>{value:g}</text>")
    for step in range(6):
        x = x0 + (x1 - x0) * step / 5
        px, _ = at(x, 10 ** y0)
        parts.append(f"<text x='{px - 12:.1f}' y='{height - margin + 18}'>{x:.0f}M</text>")
    for index, (method, pts) in enumerate(sorted(series.items())):
        color = colors[index % len(colors)]
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in (at(x, y) for x, y in sorted(pts)))
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{coords}'/>")
        for x, y in pts:
            cx, cy = at(x, y)
            parts.append(f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='3' fill='{color}'/>")
        parts.append(f"<text x='{width - margin - 140}' y='{60 + 16 * index}' fill='{color}'>{method}</text>")
    parts.append(f"<text x='{width / 2 - 60}' y='{height - 15}'>parameters (millions)</text></svg>")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
