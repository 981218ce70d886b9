"""App timings in a real browser: `streamlit run` to first page, and upload to overlay (cold and warm)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MAMMO_CHROMIUM", "/usr/bin/chromium")
HOME_TEXT = "Research tool, not a diagnostic device"
PROBABILITY = "Probability of malignancy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upload_and_wait(page, url: str, path: Path) -> float:
    """Seconds from handing the file to the uploader to its probability and overlay on screen.

    Each upload happens on a freshly loaded Review page (a new session holding one file), so the
    detail view shows this file; the model stays loaded in the server process between uploads.
    """
    page.goto(url + "/Review")
    page.wait_for_selector("[data-testid=stFileUploaderDropzoneInput]", state="attached")
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
    t = time.perf_counter()
    page.set_input_files("[data-testid=stFileUploaderDropzoneInput]", [str(path)])
    # the detail heading names the file only once the script has scored it (the uploader's own list
    # shows the name at once, so it cannot be the signal)
    page.locator("[data-testid=stHeading]", has_text=path.name).first.wait_for()
    page.locator("[data-testid=stMetric]", has_text=PROBABILITY).first.wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
    return time.perf_counter() - t


def _weights_with_active(tmp: Path, model: str) -> Path:
    """A weights folder in `tmp` that links every model folder (and manifest) of ours and names `model`
    active, so the app can be measured on a model that is not (yet) the active one."""
    from mammo_core.config import weights_dir

    src = weights_dir()
    dest = tmp / "weights"
    dest.mkdir()
    for entry in src.iterdir():
        if entry.name != "ACTIVE":
            (dest / entry.name).symlink_to(entry.resolve())
    (dest / "ACTIVE").write_text(model + "\n")
    return dest


def measure_app(sample: Path, *, runs: int = 5, model: str | None = None) -> dict:
    """Start the app on the active model (or on `model`, through a weights folder naming it active),
    measure, stop it. Needs Debian chromium and playwright."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} not found; install Debian's chromium to measure the app")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="mammo-bench-"))
    env = {**os.environ, "MAMMO_AUDIT_DB": str(tmp / "audit.sqlite3"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for name in ("MAMMO_AUTH_FILE", "MAMMO_NETWORK"):  # open mode on loopback, as the browser tests run it
        env.pop(name, None)
    from mammo_core.store.registry import active_model_name

    if model is not None and model != active_model_name():
        env["MAMMO_WEIGHTS_DIR"] = str(_weights_with_active(tmp, model))
    else:
        model = active_model_name()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError("streamlit did not start")
        health_s = time.perf_counter() - t0
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.get_by_text(HOME_TEXT).first.wait_for()
            start_s = time.perf_counter() - t0
            copies = []
            for i in range(runs + 1):
                dest = tmp / f"upload-{i}{sample.suffix}"
                shutil.copyfile(sample, dest)
                copies.append(dest)
            cold = _upload_and_wait(page, url, copies[0])
            warm = []
            for dest in copies[1:]:
                _vary(dest, seed=len(warm) + 1)
                warm.append(_upload_and_wait(page, url, dest))
            browser.close()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    warm.sort()
    return {"health_s": health_s, "start_s": start_s, "upload_cold_s": cold, "model": model,
            "upload_warm_s": warm[len(warm) // 2],
            "note": (f"the app on its active model ({model}), in headless Chromium via Playwright; first page = the home page's text visible "
                     f"(server health answered after {health_s:.1f} s); warm upload = median of {len(warm)} uploads "
                     "of distinct images after the first (model loaded and traced), each on a freshly loaded Review page, from set_input_files to the "
                     "probability and the Plotly overlay drawn and the app idle.")}


def _vary(path: Path, seed: int) -> None:
    """Make the file's pixels differ slightly so the app's per-file cache cannot answer."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L")).copy()
    img[0, :seed] = (img[0, :seed].astype(int) + 1) % 256
    Image.fromarray(img).save(path)
