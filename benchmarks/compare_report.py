"""`slimlm compare` on SmolLM2-135M: RTN, GPTQ, AWQ (W4 g64), SparseGPT 2:4 and FLAP 20% against float32, then
the same sweep with one more recipe (layer removal), which must run only the new row.

Writes `benchmarks/results/compare/` (results.json, results.md, report.html and the row cache),
`benchmarks/results/compare_rerun.{json,md}` (which rows each run computed and how long it took) and, where
Chromium and chromedriver are installed, the screenshot `docs/compare-report.png`.

    python benchmarks/compare_report.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIRST = "rtn-w4g64,gptq-w4g64,awq-w4g64,sparsegpt-2of4,flap-20"
ADDED = "drop-layers-2"
SETTINGS = ["--calib-corpus", "c4", "--calib-samples", "32", "--calib-seqlen", "512", "--eval",
            "wikitext2,piqa,arc_easy", "--seqlen", "512", "--max-windows", "16", "--limit", "100"]


def run(recipes: str, data_dir: str, out: Path) -> dict:
    command = [str(Path(sys.executable).with_name("slimlm")), "compare", "--model", "smollm2-135m", "--recipes",
               recipes, "--out", str(out), "--data-dir", data_dir, *SETTINGS]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    sys.stderr.write(done.stderr)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"slimlm compare failed ({done.returncode})")
    events = dict(re.findall(r"\] (\S+): (cached|running)", done.stderr))
    shown = " ".join(command[1:]).replace(data_dir, "DATA").replace(str(ROOT) + "/", "")
    return {"command": "slimlm " + shown, "seconds": round(seconds, 1), "rows": events}


def screenshot(page: Path, png: Path) -> str:
    """A 1900-pixel-wide screenshot of the whole page in headless Chromium, or why there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return "selenium missing"
    if not Path("/usr/bin/chromedriver").exists():
        return "chromium-driver missing"
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(argument)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_window_size(1900, 800)
        driver.get(page.as_uri())
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1900, height + 40)
        driver.save_screenshot(str(png))
    finally:
        driver.quit()
    return "written"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the cached rows and retake the screenshot (no row runs)")
    args = parser.parse_args()

    from slimlm.results import markdown_table, utc_now, write_results

    out = RESULTS / "compare"
    if args.report_only:
        run(f"{FIRST},{ADDED}", args.data_dir, out)
        print("screenshot:", screenshot(out / "report.html", ROOT / "docs" / "compare-report.png"))
        return
    runs = [run(FIRST, args.data_dir, out), run(f"{FIRST},{ADDED}", args.data_dir, out)]
    shot = screenshot(out / "report.html", ROOT / "docs" / "compare-report.png")
    rows = [{"run": i + 1, "command": r["command"], "seconds": r["seconds"],
             "computed": ", ".join(k for k, v in r["rows"].items() if v == "running"),
             "from cache": ", ".join(k for k, v in r["rows"].items() if v == "cached")} for i, r in enumerate(runs)]
    preamble = (f"# slimlm compare, run twice: the second run adds {ADDED}\n\nDate: {utc_now()}  \n"
                "Command: `python benchmarks/compare_report.py --data-dir DATA`. The table and report are in "
                f"[compare/results.md](compare/results.md) and `compare/report.html`; screenshot: {shot}.")
    write_results(RESULTS / "compare_rerun", [{"runs": runs, "screenshot": shot, "date": utc_now()}],
                  markdown_table(rows), preamble)


if __name__ == "__main__":
    main()
