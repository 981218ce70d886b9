"""One real-browser check: `streamlit run app.py` on a loopback port, headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright for Python) uploads an image on Review and reads the
probability. Skipped, with the reason, when Chromium or Playwright is missing.

The screenshot goes to $MAMMO_ARTIFACTS_DIR (default: a pytest tmp folder) as review.png.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mammo_core.config import REPO_ROOT

CHROMIUM = os.environ.get("MAMMO_CHROMIUM", "/usr/bin/chromium")

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
                if resp.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")


@pytest.fixture
def server(tiny_weights, tmp_path):
    port = _free_port()
    env = {**os.environ, "MAMMO_WEIGHTS_DIR": str(tiny_weights), "MAMMO_AUDIT_DB": str(tmp_path / "audit.sqlite3"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MAMMO_DATA_DIR", None)
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, timeout=90)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.fixture
def artifacts_dir(tmp_path) -> Path:
    path = Path(os.environ.get("MAMMO_ARTIFACTS_DIR", tmp_path / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_review_upload_in_a_real_browser(server, sample_png, tmp_path, artifacts_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")
    image = tmp_path / "scan.png"
    image.write_bytes(sample_png)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"this is not a DICOM file")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(120_000)
            page.goto(server + "/review")
            page.wait_for_selector("[data-testid=stFileUploaderDropzoneInput]", state="attached")
            page.set_input_files("[data-testid=stFileUploaderDropzoneInput]", [str(image), str(broken)])
            label = page.locator("[data-testid=stMetric]", has_text="Probability of malignancy")
            value = label.locator("[data-testid=stMetricValue]").inner_text()
            page.locator("[data-testid=stAlertContentError]", has_text="broken.dcm").wait_for()
            page.locator(".js-plotly-plot").first.wait_for()
            time.sleep(1)  # let the figure finish drawing before the screenshot
            page.screenshot(path=str(artifacts_dir / "review.png"), full_page=True)
            assert not page.locator("[data-testid=stException]").count(), "the page shows an exception"
            # app.py ran (not Streamlit's legacy pages/ mode): its sidebar model selector is there.
            assert page.locator("[data-testid=stSidebar] [data-testid=stSelectbox]").count() == 1
        finally:
            browser.close()
    assert re.fullmatch(r"[01]\.\d{3}", value.strip()), value
    assert 0.0 <= float(value) <= 1.0
    assert (artifacts_dir / "review.png").stat().st_size > 10_000
