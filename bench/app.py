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


def _upload_and_wait(page, url: str, path: Path, marks: dict | None = None) -> float:
    """Seconds from handing the file to the uploader to its probability and overlay on screen.

    Each upload happens on a freshly loaded Review page (a new session holding one file), so the
    detail view shows this file; the model stays loaded in the server process between uploads.
    `marks`, when given, receives the wall-clock times (epoch s) of the start, the end of the file's
    HTTP upload, and the end.
    """
    page.goto(url + "/Review")
    page.wait_for_selector("[data-testid=stFileUploaderDropzoneInput]", state="attached")
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
    if marks is not None:
        def finished(request) -> None:
            if "upload_file" in request.url and "uploaded" not in marks:
                marks["uploaded"] = time.time()

        page.on("requestfinished", finished)
        marks["start"] = time.time()
    t = time.perf_counter()
    page.set_input_files("[data-testid=stFileUploaderDropzoneInput]", [str(path)])
    # the detail heading names the file only once the script has scored it (the uploader's own list
    # shows the name at once, so it cannot be the signal)
    page.locator("[data-testid=stHeading]", has_text=path.name).first.wait_for()
    page.locator("[data-testid=stMetric]", has_text=PROBABILITY).first.wait_for()
    if marks is not None:
        marks["metric"] = time.time()
    # Review's default panels are plain images (the Plotly figure is behind "Zoom and pan"): drawn when all
    # are decoded
    page.wait_for_function("() => { const i = [...document.querySelectorAll('[data-testid=stImage] img')];"
                           " return i.length >= 3 && i.every(e => e.complete && e.naturalWidth > 0); }")
    if marks is not None:
        marks["plot"] = time.time()
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
    if marks is not None:
        marks["end"] = time.time()
        page.remove_listener("requestfinished", finished)
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


def measure_app(sample: Path, *, runs: int = 5, model: str | None = None, trace: bool = False) -> dict:
    """Start the app on the active model (or on `model`, through a weights folder naming it active),
    measure, stop it. Needs Debian chromium and playwright.

    `trace=True` starts the server through `bench.app_trace` (timers around the Review page's pieces) and
    adds "pieces": for each piece, the median over the warm uploads of its seconds per upload, beside the
    browser's own share (the file's HTTP upload, and what remains after the server's script run: the
    websocket messages, drawing the page and the Plotly figure). The timers add the figure's JSON
    serialisation once more per upload, so the untraced run gives the figure to quote."""
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
    if trace:
        env["MAMMO_BENCH_TRACE"] = str(tmp / "trace.jsonl")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.app_trace" if trace else "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
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
            warm, marks = [], []
            for dest in copies[1:]:
                _vary(dest, seed=len(warm) + 1)
                marks.append({})
                warm.append(_upload_and_wait(page, url, dest, marks[-1]))
            browser.close()
        pieces = _pieces(tmp / "trace.jsonl", marks) if trace else None
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    warm.sort()
    return {"health_s": health_s, "start_s": start_s, "upload_cold_s": cold, "model": model,
            "upload_warm_s": warm[len(warm) // 2], "upload_warm_all_s": warm,
            **({"pieces": pieces} if pieces is not None else {}),
            "note": (f"the app on its active model ({model}), in headless Chromium via Playwright; first page = the home page's text visible "
                     f"(server health answered after {health_s:.1f} s); warm upload = median of {len(warm)} uploads "
                     "of distinct images after the first (model loaded and traced), each on a freshly loaded Review page, from set_input_files to the "
                     "probability and the image panels (Review's default; before 2026-11-30 23:00 the Plotly overlay) drawn and the app idle.")}


def _pieces(trace_file: Path, marks: list[dict]) -> dict:
    """Median over the uploads of each piece's seconds per upload (the server's timed calls that started
    within the upload's span), plus the browser's share: the HTTP upload, and the total minus the upload
    and the server's script runs."""
    import json
    import statistics

    rows = [json.loads(line) for line in trace_file.read_text().splitlines()] if trace_file.exists() else []
    per_upload = []
    for m in marks:
        got: dict[str, float] = {}
        for row in rows:
            if m["start"] <= row["t"] <= m["end"]:
                got[row["piece"]] = got.get(row["piece"], 0.0) + row["s"]
                if "json_bytes" in row:
                    got["Plotly figure JSON (bytes)"] = row["json_bytes"]
        total = m["end"] - m["start"]
        upload = m.get("uploaded", m["start"]) - m["start"]
        got["total (browser: set_input_files to overlay shown, app idle)"] = total
        got["browser: file sent (HTTP upload finished)"] = upload
        got["script runs in this span"] = sum(1 for r in rows if r["piece"] == "script run (whole page)"
                                              and m["start"] <= r["t"] <= m["end"])
        got["browser and websocket: total - upload - script runs"] = total - upload - got.get("script run (whole page)", 0.0)
        runs = [r for r in rows if r["piece"] == "script run (whole page)" and m["start"] <= r["t"] <= m["end"]]
        if runs:
            first, last_end = min(r["t"] for r in runs), max(r["t"] + r["s"] for r in runs)
            got["browser: upload finished to script run start"] = first - m.get("uploaded", m["start"])
            got["browser: script run end to probability shown"] = m["metric"] - last_end
        got["browser: probability shown to panels drawn"] = m["plot"] - m["metric"]
        got["browser: panels drawn to app idle (status widget gone)"] = m["end"] - m["plot"]
        per_upload.append(got)
    keys = sorted({k for got in per_upload for k in got})
    out = {k: statistics.median(got.get(k, 0.0) for got in per_upload) for k in keys}
    # the pieces of one upload (the one with the median total) add up; medians of pieces need not
    totals = sorted(range(len(per_upload)), key=lambda i: per_upload[i]["total (browser: set_input_files to overlay shown, app idle)"])
    out["median upload"] = per_upload[totals[len(totals) // 2]] if per_upload else {}
    return out


def _vary(path: Path, seed: int) -> None:
    """Make the file's pixels differ slightly so the app's per-file cache cannot answer."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L")).copy()
    img[0, :seed] = (img[0, :seed].astype(int) + 1) % 256
    Image.fromarray(img).save(path)
