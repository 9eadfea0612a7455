"""`slimlm compare`: rows, the row cache, the three output files, the Pareto frontier and bad input."""

from __future__ import annotations

import json
import re

import pytest

from slimlm.cli import main
from slimlm.report.plots import Point, nice_ticks, pareto_front
from slimlm.report.tables import display_rows, markdown

SMALL = ["--eval", "pydoc", "--seqlen", "32", "--max-windows", "2", "--repeats", "1", "--new-tokens", "4",
         "--prompt-tokens", "8", "--calib-corpus", "pydoc", "--calib-samples", "2", "--calib-seqlen", "32"]


def _events(text: str) -> dict[str, str]:
    """Row name -> what the sweep did with it (cached / running)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"\] (\S+): (cached|running)", text)}


def test_compare_writes_three_files_and_reruns_only_what_changed(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", tiny_dir, "--recipes", "rtn-w4g32,magnitude-50", "--out", str(out),
                 *SMALL]) == 0
    first = capsys.readouterr()
    assert _events(first.err) == {"float": "running", "rtn-w4g32": "running", "magnitude-50": "running"}
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "report.html", "rows"}
    record = json.loads((out / "results.json").read_text())
    rows = record["metrics"]["rows"]
    assert [r["name"] for r in rows] == ["float", "rtn-w4g32", "magnitude-50"]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    float_row, rtn, pruned = rows
    assert rtn["disk_bytes"] < float_row["disk_bytes"]
    assert pruned["nonzero_parameters"] < pruned["parameters"] - 10_000  # half of every block linear
    assert float_row["speed"]["decode_speedup"] == 1.0
    assert {q["metric"] for q in rtn["quality"]} == {"ppl", "kl_mean", "top1_agreement"}
    assert {q["metric"] for q in float_row["quality"]} == {"ppl"}  # no KL of the float model from itself
    assert record["protocol"]["eval"]["tasks"] == ["pydoc"] and record["versions"]["slimlm"]
    assert "| rtn-w4g32 |" in first.out and str(out / "report.html") in first.out

    # One more recipe: only it runs; the others come from the cache, numbers unchanged.
    assert main(["compare", "--model", tiny_dir, "--recipes", "rtn-w4g32,magnitude-50,rtn-w8ch", "--out", str(out),
                 *SMALL]) == 0
    assert _events(capsys.readouterr().err) == {"float": "cached", "rtn-w4g32": "cached", "magnitude-50": "cached",
                                               "rtn-w8ch": "running"}
    again = json.loads((out / "results.json").read_text())["metrics"]["rows"]
    assert again[1]["quality"] == rtn["quality"] and len(again) == 4

    # A changed evaluation setting changes every row's key: all rerun.
    assert main(["compare", "--model", tiny_dir, "--recipes", "rtn-w4g32", "--out", str(out), "--format", "md",
                 *SMALL[:4], "--max-windows", "1", *SMALL[6:]]) == 0
    assert _events(capsys.readouterr().err) == {"float": "running", "rtn-w4g32": "running"}


def test_report_page_is_self_contained_with_plots(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", tiny_dir, "--recipes", "rtn-w4g32,rtn-w2g32", "--out", str(out),
                 "--format", "html", *SMALL]) == 0
    capsys.readouterr()
    assert not (out / "results.json").exists() and not (out / "results.md").exists()
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 2 and page.count('class="point"') == 6  # two plots, three rows each
    assert 'class="frontier"' in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "<link" not in page  # nothing to fetch: opens offline
    assert "Round-to-nearest weight quantization" in page  # each recipe's paragraph


def test_pareto_front_keeps_only_undominated_points():
    points = [Point("a", 100, 30.0), Point("b", 200, 25.0), Point("c", 150, 40.0), Point("d", 50, 60.0),
              Point("e", 200, 26.0)]
    front = pareto_front(points, x_higher_better=False, y_higher_better=False)
    assert [p.label for p in front] == ["d", "a", "b"]  # c loses to a on both; e to b on quality
    fast = pareto_front([Point("f", 1.0, 30.0), Point("q", 1.4, 35.0), Point("s", 0.9, 33.0)], True, False)
    assert [p.label for p in fast] == ["f", "q"]


@pytest.mark.parametrize("low, high", [(30.9, 65.2), (1.0, 1.38), (114.9, 538.0), (5.0, 5.0), (-0.2, 0.7)])
def test_ticks_cover_the_range(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and len(ticks) >= 2


def test_a_failed_row_is_shown_with_its_error():
    rows = [{"name": "float", "status": "ok", "quality": [{"task": "pydoc", "metric": "ppl", "value": 10.0}],
             "parameters": 1000, "nonzero_parameters": 1000, "disk_bytes": 4000, "bits_per_parameter": 32.0,
             "compression_seconds": None, "peak_rss_bytes": None,
             "speed": {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0, "prefill_speedup": 1.0,
                       "decode_speedup": 1.0, "kernels": "float"}},
            {"name": "awq-w4g64", "status": "failed", "error": "AWQ needs one norm per half"}]
    lines, columns = display_rows(rows)
    assert lines[1]["kernels"] == "failed: AWQ needs one norm per half"
    assert "pydoc ppl" in columns and "| awq-w4g64 |" in markdown(rows)


@pytest.mark.parametrize("extra, message", [
    (["--recipes", "gptq-w4g64,nonsense"], "unknown recipe 'nonsense'"),
    (["--recipes", "rtn-w4g32,rtn-w4g32"], "more than once"),
    (["--recipes", "rtn-w4g32", "--format", "pdf"], "--format pdf"),
    (["--recipes", "rtn-w4g32", "--eval", "wikitext9"], "unknown task"),
])
def test_bad_input_fails_before_any_row(extra, message, tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "cmp"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "rows").exists()


def test_a_refused_recipe_is_a_failed_row_and_exit_code_1(tokenizer, tmp_path, capsys):
    """AWQ refuses Phi (attention and MLP share one norm) inside the row's process: the sweep goes on, the
    row shows the refusal, the exit code is 1, and the next run tries it again."""
    from slimlm.models.tiny import tiny_model

    model_dir = tmp_path / "tiny-phi"
    tiny_model("phi", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(model_dir), "--recipes", "awq-w4g32,rtn-w4g32", "--out", str(out), *SMALL]
    assert main(args) == 1
    captured = capsys.readouterr()
    rows = json.loads((out / "results.json").read_text())["metrics"]["rows"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "norm" in rows[1]["error"] and "failed rows (tried again on the next run): awq-w4g32" in captured.out
    assert main(args) == 1
    assert _events(capsys.readouterr().err) == {"float": "cached", "awq-w4g32": "running", "rtn-w4g32": "cached"}
