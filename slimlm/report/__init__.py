"""`slimlm compare`: the float model and a list of recipes measured side by side, written as JSON, Markdown
and a self-contained HTML page (`slimlm.report.sweep` runs the rows, `slimlm.report.tables` formats them,
`slimlm.report.html` draws the page)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from slimlm.report.sweep import EvalPlan, SpeedPlan, Sweep, run_sweep

FORMATS = ("json", "md", "html")


def protocol(sweep: Sweep) -> dict:
    return {"eval": asdict(sweep.eval), "speed": asdict(sweep.speed), "calibration_overrides": sweep.calibration,
            "kl": sweep.kl, "dtype": sweep.dtype, "device": sweep.device, "seed": sweep.seed,
            "data_dir": None if sweep.data_dir is None else str(sweep.data_dir)}


def write_report(sweep: Sweep, rows: list[dict], formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """Write `results.json`, `results.md` and `report.html` (those in `formats`) into `sweep.out`."""
    from slimlm.report.html import report_html
    from slimlm.report.tables import markdown
    from slimlm.results import atomic_write_text, make_record

    record = make_record(sweep.model, ",".join(sweep.recipes), protocol(sweep), {"rows": rows})
    written = {}
    if "json" in formats:
        written["json"] = sweep.out / "results.json"
        atomic_write_text(written["json"], json.dumps(record, indent=1) + "\n")
    meta = _meta(record)
    if "md" in formats:
        written["md"] = sweep.out / "results.md"
        lines = "".join(f"{key}: {value}  \n" for key, value in meta.items())
        atomic_write_text(written["md"], f"# slimlm compare: {sweep.model}\n\n{lines}\n{markdown(rows)}")
    if "html" in formats:
        written["html"] = sweep.out / "report.html"
        atomic_write_text(written["html"], report_html(rows, f"slimlm compare: {sweep.model}", meta))
    return written


def _meta(record: dict) -> dict[str, str]:
    p, m, v = record["protocol"], record["machine"], record["versions"]
    e = p["eval"]
    windows = "all windows" if e["max_windows"] is None else f"first {e['max_windows']} windows"
    examples = "all examples" if e["limit"] is None else f"first {e['limit']} examples"
    s = p["speed"]
    return {
        "Command": record["command"],
        "Date": record["date"],
        "Machine": f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
                   + (f", {m['cuda']}" if m.get("cuda") else ""),
        "Versions": ", ".join(f"{k} {val}" for k, val in v.items() if k in ("slimlm", "torch", "transformers")),
        "Evaluation": f"tasks {', '.join(e['tasks'])}; perplexity seqlen {e['seqlen']}, {windows}; zero-shot "
                      f"{examples}" + ("; KL(float || compressed) on every perplexity corpus" if p["kl"] else ""),
        "Speed": f"prompt {s['prompt_tokens']} random tokens, {s['new_tokens']} new tokens, batch 1, "
                 f"{s['repeats']} repeats in alternating runs with the float model",
        "Calibration": "each recipe's own" + (f", overridden: {p['calibration_overrides']}"
                                              if p["calibration_overrides"] else ""),
    }


__all__ = ["EvalPlan", "FORMATS", "SpeedPlan", "Sweep", "run_sweep", "write_report"]
