"""The HTML report opened in a real headless browser (Debian's chromium driven through chromedriver).

The browser comes from Debian's packages: when it is missing, CI (CI=true, as root) installs it with apt-get;
anywhere else the test is skipped with the command that installs it (or set SLIMLM_INSTALL_BROWSER=1)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from slimlm.report.html import report_html

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]


def _install_browser() -> str | None:
    """None when chromium and chromedriver are there (installed here if allowed), else why not."""
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return None
    allowed = os.environ.get("CI") == "true" or os.environ.get("SLIMLM_INSTALL_BROWSER") == "1"
    if not allowed or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"no headless browser: run `{' '.join(INSTALL)}` as root (or set SLIMLM_INSTALL_BROWSER=1)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
    done = subprocess.run(INSTALL, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return f"installing chromium failed: {done.stderr[-300:]}"
    return None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in slimlm's dev extras")
    from selenium.webdriver.chrome.service import Service

    reason = _install_browser()
    if reason is not None:
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1300"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # the given driver: no download
    yield driver
    driver.quit()


def _row(name: str, ppl: float, megabytes: float, speedup: float) -> dict:
    quality = [{"task": "wikitext2", "metric": "ppl", "value": ppl, "stderr": None, "n": 100, "protocol": ""}]
    if name != "float":
        quality.append({"task": "wikitext2", "metric": "kl_mean", "value": 0.1, "stderr": None, "n": 100,
                        "protocol": "", "kl_median": 0.05, "kl_p99": 1.0})
    return {"name": name, "status": "ok", "quality": quality, "parameters": 134_515_008,
            "nonzero_parameters": 134_515_008, "disk_bytes": int(megabytes * 1e6),
            "bits_per_parameter": 8 * megabytes * 1e6 / 134_515_008, "compression_seconds": 10.0,
            "peak_rss_bytes": 1_500_000_000,
            "speed": {"prefill_tokens_per_s": 500.0, "decode_tokens_per_s": 30 * speedup,
                      "prefill_speedup": 1.0, "decode_speedup": speedup, "kernels": "int4"},
            "spec": {"recipe": None}}


def _severe(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_report_opens_without_console_errors_and_draws_both_plots(browser, tmp_path):
    rows = [_row("float", 30.9, 538.0, 1.0), _row("gptq-w4g64", 38.5, 114.9, 1.3), _row("wanda-50", 65.2, 269.1, 0.95)]
    page = tmp_path / "report.html"
    page.write_text(report_html(rows, "slimlm compare: test", {"Command": "slimlm compare ..."}), encoding="utf-8")
    browser.get(page.as_uri())
    assert _severe(browser) == []
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('svg.plot')].map(s => s.getBoundingClientRect().width)")
    assert len(sizes) == 2 and min(sizes) > 300  # both plots laid out
    assert browser.execute_script("return document.querySelectorAll('svg.plot circle.point').length") == 6
    assert browser.execute_script("return document.querySelectorAll('tbody tr').length") == 3
    shot = tmp_path / "shot.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000


def test_a_console_error_would_be_seen(browser, tmp_path):
    """The check above can fail: a page with a script error and a missing image shows both."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><script>missing_function();</script><img src="nowhere.png"></body></html>')
    browser.get(page.as_uri())
    messages = " ".join(_severe(browser))
    assert "missing_function" in messages and "nowhere.png" in messages
