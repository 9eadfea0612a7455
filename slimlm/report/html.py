"""The self-contained HTML report of a sweep: the table, Pareto plots of quality against bytes and against
decode speed (frontier marked), and a paragraph per recipe. CSS and SVG are inline and there is no script, so
the page opens offline and prints as it shows."""

from __future__ import annotations

from html import escape

from slimlm.report.plots import Point, pareto_front, scatter_svg
from slimlm.report.tables import display_rows, headline, quality_value

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1880px; color: #222; padding: 0 16px; }
table { border-collapse: collapse; margin: 12px 0; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 4px 6px; text-align: right; white-space: nowrap; }
th { white-space: normal; vertical-align: bottom; }
.scroll { overflow-x: auto; }
th:first-child, td:first-child { text-align: left; }
th { background: #f1f3f5; }
tr.failed td { color: #c92a2a; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
svg.plot text { font: 11px sans-serif; fill: #333; }
svg.plot text.label { font-size: 11px; fill: #111; }
.meta { color: #555; font-size: 13px; }
code { background: #f1f3f5; padding: 0 3px; }
"""


def report_html(rows: list[dict], title: str, meta: dict[str, str]) -> str:
    """The page for `rows` (sweep rows, float first); `meta` lines are shown under the title."""
    lines, columns = display_rows(rows)
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        f'<tr class="{"ok" if row.get("status") == "ok" else "failed"}">'
        + "".join(f"<td>{escape(str(line[c]))}</td>" for c in columns) + "</tr>"
        for row, line in zip(rows, lines))
    meta_html = "".join(f"<div><b>{escape(k)}:</b> {escape(v)}</div>" for k, v in meta.items())
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1><div class=\"meta\">{meta_html}</div>"
        f"<h2>Results</h2><div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
        "</table></div>"
        "<p class=\"meta\">Speed is slimlm's generation engine, batch 1, median of the repeats; the ratio in "
        "brackets is to the float model measured in alternating runs in the same process, the number to compare "
        "between rows (absolute tokens/s move with the machine's load).</p>"
        f"<h2>Trade-offs</h2>{_plots(rows)}<h2>Recipes</h2>{_recipes(rows)}</body></html>\n"
    )


def _plots(rows: list[dict]) -> str:
    ok = [row for row in rows if row.get("status") == "ok"]
    key = headline(ok)
    if key is None or not ok:
        return "<p>No quality measurement to plot.</p>"
    task, metric = key
    higher = metric.startswith("acc")
    quality = {row["name"]: quality_value(row, task, metric) for row in ok}
    ok = [row for row in ok if quality[row["name"]] is not None]
    y_label = f"{task} {metric} ({'higher' if higher else 'lower'} is better)"
    by_bytes = [Point(row["name"], row["disk_bytes"] / 1e6, quality[row["name"]]["value"]) for row in ok]
    by_speed = [Point(row["name"], row["speed"]["decode_speedup"], quality[row["name"]]["value"]) for row in ok]
    svgs = [
        scatter_svg(by_bytes, pareto_front(by_bytes, False, higher), "checkpoint size (MB)", y_label,
                    "quality against bytes"),
        scatter_svg(by_speed, pareto_front(by_speed, True, higher), "decode speed relative to float (x)", y_label,
                    "quality against decode speed"),
    ]
    return ("<p>Filled orange points lie on the Pareto frontier (no other row is at least as good on both axes); "
            "the dashed line joins them.</p><div class=\"plots\">" + "".join(svgs) + "</div>")


def _recipes(rows: list[dict]) -> str:
    from slimlm.core.registry import load_plugins, stage_class

    load_plugins()
    items = []
    for row in rows:
        recipe = (row.get("spec") or {}).get("recipe")
        if recipe is None:
            items.append(f"<li><b>{escape(row['name'])}</b>: the model as loaded, the reference for every ratio "
                         "and KL divergence.</li>")
            continue
        stages = []
        for stage in recipe["stages"]:
            cls = stage_class(stage["method"])
            doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()) if cls else ""
            stages.append(f"<code>{escape(stage['method'])}</code> ({escape(_settings(stage, cls))}): {escape(doc)}")
        calibration = recipe.get("calibration") or {}
        calib = (f" Calibration: {calibration.get('samples')} x {calibration.get('seqlen')} tokens of "
                 f"{calibration.get('corpus')}, seed {calibration.get('seed')}." if _calibrates(row) else "")
        items.append(f"<li><b>{escape(row['name'])}</b>: " + "; then ".join(stages) + escape(calib) + "</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _calibrates(row: dict) -> bool:
    from slimlm.compress import load_recipe

    return load_recipe(row["spec"]["recipe"]).needs_calibration


def _settings(stage: dict, cls) -> str:
    """The stage's settings that differ from the method's defaults."""
    fields = getattr(cls, "model_fields", {})
    changed = {k: v for k, v in stage.items()
               if k != "method" and (k not in fields or fields[k].get_default(call_default_factory=True) != v)}
    return ", ".join(f"{k} {v}" for k, v in changed.items()) or "defaults"
