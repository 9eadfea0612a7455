"""The comparison table: one line per row of a sweep, the same columns in Markdown and in the HTML report.

Values are formatted by `slimlm.results.format_value`, the function every benchmark table goes through.
"""

from __future__ import annotations

from slimlm.results import format_value, markdown_table


def quality_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs measured in any row: tasks in first-seen order, each task's metrics together."""
    seen: dict[str, dict[str, None]] = {}
    for row in rows:
        for q in row.get("quality", []):
            seen.setdefault(q["task"], {})[q["metric"]] = None
    return [(task, metric) for task, metrics in seen.items() for metric in metrics]


def headline(rows: list[dict]) -> tuple[str, str] | None:
    """The quality number plots use: the first perplexity (lower is better), else the first accuracy."""
    columns = quality_columns(rows)
    return next((c for c in columns if c[1] == "ppl"), next((c for c in columns if c[1].startswith("acc")), None))


def quality_value(row: dict, task: str, metric: str) -> dict | None:
    return next((q for q in row.get("quality", []) if q["task"] == task and q["metric"] == metric), None)


def display_rows(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows flattened to display strings, and the column names in order."""
    columns = ["recipe"]
    for task, metric in quality_columns(rows):
        columns.append(f"{task} {_metric_label(metric)}")
    columns += ["parameters", "bytes", "bits/param", "compress s", "peak RSS", "prefill tok/s", "decode tok/s",
                "kernels"]
    out = []
    for row in rows:
        line = {"recipe": row["name"]}
        if row.get("status") != "ok":
            line.update({c: "" for c in columns[1:]})
            line["kernels"] = "failed: " + str(row.get("error", ""))[:160]
            out.append(line)
            continue
        for task, metric in quality_columns(rows):
            line[f"{task} {_metric_label(metric)}"] = _quality_cell(quality_value(row, task, metric))
        speed = row["speed"]
        line.update({
            "parameters": _parameters(row),
            "bytes": _size(row["disk_bytes"]),
            "bits/param": f"{row['bits_per_parameter']:.2f}",
            "compress s": "" if row["compression_seconds"] is None else f"{row['compression_seconds']:.1f}",
            "peak RSS": "" if row["peak_rss_bytes"] is None else _size(row["peak_rss_bytes"]),
            "prefill tok/s": f"{speed['prefill_tokens_per_s']:.0f} ({speed['prefill_speedup']:.2f}x)",
            "decode tok/s": f"{speed['decode_tokens_per_s']:.1f} ({speed['decode_speedup']:.2f}x)",
            "kernels": speed["kernels"],
        })
        out.append(line)
    return out, columns


def _parameters(row: dict) -> str:
    """Parameters, and the non-zero ones where pruning left zeros."""
    text = f"{row['parameters'] / 1e6:.1f}M"
    if row["nonzero_parameters"] < 0.99 * row["parameters"]:
        text += f" ({row['nonzero_parameters'] / 1e6:.1f}M non-zero)"
    return text


def _metric_label(metric: str) -> str:
    return {"kl_mean": "KL mean (median / p99)", "top1_agreement": "top-1 agree"}.get(metric, metric)


def _quality_cell(q: dict | None) -> str:
    if q is None:
        return ""
    value = format_value(q["value"])
    if q["metric"] == "kl_mean" and "kl_median" in q:
        return f"{value} ({format_value(q['kl_median'])} / {format_value(q['kl_p99'])})"
    stderr = q.get("stderr")
    return value if stderr is None else f"{value} ± {format_value(stderr)}"


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def markdown(rows: list[dict]) -> str:
    lines, columns = display_rows(rows)
    return markdown_table(lines, columns)
