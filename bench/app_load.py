"""The app under load and its memory (issue 15), in real browsers: `python -m bench.app_load`.

A. load: N concurrent browser sessions (headless Chromium pages, each its own Streamlit session) each
   upload M dataset test images one after another on Review, as fast as the app answers. Per upload:
   seconds from handing the file to the uploader to the worklist counting it, the probability and the
   three image panels drawn (Review's default, plain images; the Plotly figure is on request) and the
   app idle. p50/p95 over all uploads, and the server's RSS before, at
   peak and after the sessions close.
B. memory: S sessions each upload U large PNGs (default 8000 x 10000 grayscale, 80 MP, a breast-like
   shape; decoded reduced to <= 4096 px by `mammo_core.io.images`). Server RSS idle, at peak, after the
   uploads, then after the browsers close: sampled for --close-wait seconds (Streamlit keeps a
   disconnected session for reconnection, `server.disconnectedSessionTTL`, 120 s by default), then once
   more after a later visitor opens and leaves a page (Streamlit reaps expired sessions only when its
   session storage is written).

Each part starts its own `streamlit run app.py` on a free loopback port, in open local mode (no login,
127.0.0.1), on the active model or `--model`. Server RSS = the streamlit process and its children
(psutil if installed, else /proc). Uploads go under neutral names (upload-s1-u2.png): no dataset file
name (they hold patient numbers) reaches the page, the log or the summary. `--profile` samples the
server with py-spy during part A (install it into the venv; it is not a requirement of the app).

Prints one JSON summary; `--write` appends a results block to docs/BENCHMARKS.md (its own section).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from bench.app import CHROMIUM, PROBABILITY, _vary, _weights_with_active

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
SECTION = "## The app under load and its memory (issue 15)"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
UPLOADER = "[data-testid=stFileUploaderDropzoneInput]"
MB = 1024 * 1024

# Done when the worklist counts the k-th file (the script scored it), the probability and the panels are
# on the page and no script run is in progress; or when an error names a file that could not be scored.
_DONE_JS = """
(k) => {
  const heads = [...document.querySelectorAll('[data-testid=stHeading]')].map(e => e.textContent);
  if ([...document.querySelectorAll('[data-testid=stAlertContainer]')].some(e => e.textContent.includes('could not be scored')))
    return 'error';
  if (!heads.some(t => t.includes('Worklist (' + k + ' scored'))) return false;
  if (![...document.querySelectorAll('[data-testid=stMetric]')].some(e => e.textContent.includes('%s'))) return false;
  const imgs = [...document.querySelectorAll('[data-testid=stImage] img')];
  if (imgs.length < 3 || !imgs.every(i => i.complete && i.naturalWidth > 0)) return false;
  return document.querySelector('[data-testid=stStatusWidget]') ? false : 'ok';
}
""" % PROBABILITY


# The server's answer has reached the page: the worklist counts the k-th file, or an error is shown
# (the panels may still be rendering).
_LISTED_JS = """
(k) => [...document.querySelectorAll('[data-testid=stHeading]')].some(e => e.textContent.includes('Worklist (' + k + ' scored'))
  || [...document.querySelectorAll('[data-testid=stAlertContainer]')].some(e => e.textContent.includes('could not be scored'))
"""


# --- the server and its memory ----------------------------------------------------------------------

def server_env(tmp: Path, model: str | None) -> tuple[dict, str]:
    """The app's environment as `bench.app` runs it (open local mode, audit log in `tmp`) and the model."""
    from mammo_core.store.registry import active_model_name

    env = {**os.environ, "MAMMO_AUDIT_DB": str(tmp / "audit.sqlite3"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for name in ("MAMMO_AUTH_FILE", "MAMMO_NETWORK", "MAMMO_AUDIT_URL"):
        env.pop(name, None)
    if model is not None and model != active_model_name():
        env["MAMMO_WEIGHTS_DIR"] = str(_weights_with_active(tmp, model))
    else:
        model = active_model_name()
    return env, model


def server_pid(port: int) -> int:
    """The pid of the `streamlit run` this bench started on `port`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"streamlit" in b" ".join(argv) and b"--server.port" in argv and str(port).encode() in argv:
            return int(entry.name)
    raise RuntimeError(f"no streamlit process found on port {port}")


def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a process gone between listing and reading
        return 0
    total = 0
    for p in _children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Sampler:
    """Samples the server's RSS and the 1-minute load average every `every` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int, float]] = []  # (monotonic, rss, load1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), rss_bytes(self.pid), os.getloadavg()[0]))
            self._stop.wait(self.every)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> int:
        return rss_bytes(self.pid)

    def peak(self, since: float = 0.0) -> int:
        return max((r for t, r, _ in self.samples if t >= since), default=0)

    def load(self, since: float = 0.0) -> dict:
        loads = [lo for t, _, lo in self.samples if t >= since]
        return {"min": min(loads), "max": max(loads), "mean": statistics.fmean(loads)} if loads else {}


def _mb(n: int) -> float:
    return round(n / MB, 1)


# --- inputs --------------------------------------------------------------------------------------

def dataset_uploads(data: Path, tmp: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct test images copied under neutral names, each varied (bench.app._vary) so that no
    cache can answer even when the same picture is drawn twice."""
    files = sorted((data / "test").rglob("*.png"))
    if not files:
        raise SystemExit(f"no test PNGs under {data / 'test'}: set MAMMO_DATA_DIR to the dataset folder")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(files), size=n, replace=n > len(files))
    out = []
    for i, j in enumerate(picks):
        dest = tmp / f"load-{i}.png"
        shutil.copyfile(files[j], dest)
        _vary(dest, seed=i + 1)
        out.append(dest)
    return out


def breast_like_png(path: Path, width: int = 8000, height: int = 10000) -> Path:
    """A `width` x `height` 8-bit grayscale PNG with a breast-like shape: a half-ellipse against the left
    edge, bright tissue fading towards the skin line, smooth texture, black background. Built in strips
    so this process stays small; compresses to a few MB (no pixel noise)."""
    from PIL import Image

    img = Image.new("L", (width, height))
    cols = np.arange(width, dtype=np.float32)[None, :]
    strip = 500
    for top in range(0, height, strip):
        rows = np.arange(top, min(top + strip, height), dtype=np.float32)[:, None]
        ry, rx = (rows - height / 2) / (0.46 * height), cols / (0.8 * width)
        r = np.sqrt(rx ** 2 + ry ** 2)
        inside = r < 1.0
        tissue = 120 + 70 * (1 - r) + 25 * np.sin(rows / 97.0) * np.cos(cols / 131.0) + 15 * np.sin((rows + cols) / 41.0)
        block = np.where(inside, np.clip(tissue, 0, 255), 0).astype(np.uint8)
        img.paste(Image.fromarray(block), (0, top))
    img.save(path, compress_level=6)
    return path


def png_variant(base: bytes, tag: int) -> bytes:
    """The same PNG with a private ancillary chunk before IEND: other bytes (another sha256, so no cache
    answers), the same pixels (decoders skip unknown ancillary chunks), no re-encoding of 80 MP."""
    data = f"bench variant {tag}".encode()
    chunk = len(data).to_bytes(4, "big") + b"bnCh" + data + zlib.crc32(b"bnCh" + data).to_bytes(4, "big")
    iend = base.rindex(b"IEND") - 4
    return base[:iend] + chunk + base[iend:]


# --- browser sessions ------------------------------------------------------------------------------

async def open_review(browser, url: str, timeout_ms: int):
    context = await browser.new_context(viewport={"width": 1400, "height": 1600})
    page = await context.new_page()
    page.set_default_timeout(timeout_ms)
    await page.goto(url + "/Review")
    await page.wait_for_selector(UPLOADER, state="attached")
    await page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')", polling=100)
    return context, page


async def upload_and_wait(page, path: Path, k: int, timeout_ms: int) -> dict:
    """Add `path` to the session's uploads (the k-th); seconds until the page shows it scored."""
    t = time.perf_counter()
    listed = None
    try:
        await page.set_input_files(UPLOADER, [str(path)])
        await page.wait_for_function(_LISTED_JS, arg=k, polling=100, timeout=timeout_ms)
        listed = time.perf_counter() - t
        handle = await page.wait_for_function(_DONE_JS, arg=k, polling=100, timeout=timeout_ms)
        outcome = await handle.json_value()
    except Exception as exc:  # noqa: BLE001 - a timeout or a closed page is a result, not a crash
        outcome = f"failed: {type(exc).__name__}"
    return {"seconds": time.perf_counter() - t, "listed_seconds": listed, "outcome": outcome, "k": k}


async def session(browser, url: str, files: list[Path], timeout_ms: int, think_s: float, ready: list,
                  start: asyncio.Event, results: list, keep_open: list) -> None:
    context, page = await open_review(browser, url, timeout_ms)
    keep_open.append(context)
    ready.append(page)
    await start.wait()
    for k, path in enumerate(files, start=1):
        results.append(await upload_and_wait(page, path, k, timeout_ms))
        if think_s:
            await asyncio.sleep(think_s)


async def run_sessions(url: str, plan: list[list[Path]], *, timeout_ms: int, think_s: float = 0.0,
                       on_uploaded=None, on_closed=None) -> tuple[list, float]:
    """Open one page per entry of `plan` (each its own browser context and Streamlit session), start
    their uploads together once every page is loaded, close them all at the end. Returns (per-upload
    results, wall seconds of the uploading phase). `on_uploaded()` runs before the pages close,
    `on_closed()` (async) after."""
    from playwright.async_api import async_playwright

    results: list = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        start, ready, keep_open = asyncio.Event(), [], []
        tasks = [asyncio.create_task(session(browser, url, files, timeout_ms, think_s, ready, start, results, keep_open))
                 for files in plan]
        while len(ready) < len(plan):
            if any(t.done() for t in tasks):  # a page failed to load: raise its error
                await asyncio.gather(*tasks)
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        if on_uploaded:
            on_uploaded()
        for context in keep_open:
            await context.close()
        await browser.close()
    if on_closed:
        await on_closed()
    return results, wall


async def visit_and_leave(url: str, timeout_ms: int) -> None:
    """A later visitor: open Review, then close the browser (a disconnect that writes Streamlit's
    session storage, which is when it reaps expired sessions)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context, _ = await open_review(browser, url, timeout_ms)
        await context.close()
        await browser.close()


async def warm_up(url: str, sample: Path, timeout_ms: int) -> None:
    """One session loads the model and scores one image (traces the compiled calls), then leaves."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context, page = await open_review(browser, url, timeout_ms)
        r = await upload_and_wait(page, sample, 1, timeout_ms)
        if r["outcome"] != "ok":
            raise RuntimeError(f"warm-up upload did not score ({r['outcome']})")
        await context.close()
        await browser.close()


# --- py-spy --------------------------------------------------------------------------------------

def start_profile(pid: int, out: Path, seconds: int) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found: no profile (pip install py-spy)", file=sys.stderr)
        return None
    return subprocess.Popen([spy, "record", "-p", str(pid), "-o", str(out), "--format", "raw", "-r", "50",
                             "-d", str(seconds), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: Where a sample's time goes: the first rule whose pattern is in the collapsed stack wins (most specific first).
PROFILE_BUCKETS = [
    ("Grad-CAM / model call (TensorFlow)", r"score_batch|_fill_batch|ensemble\.py|explain\.py|tensorflow"),
    ("decode + preprocessing", r"\(_load \(|_decode|load_image|preprocessing\.py|imaging\.py|input_warnings"),
    ("overlay + heatmap back onto the original", r"heatmap_on_original|overlay \(|outline_on"),
    ("Plotly figure build + JSON", r"image_triplet_figure|plotly|add_colour_bar|_plotly_chart|to_json|to_plotly_json"),
    ("hashing uploads", r"sha256|hexdigest"),
    ("audit log", r"audit"),
    ("dataframe / Arrow serialisation", r"arrow|dataframe|pyarrow"),
    ("Streamlit other (runner, protobuf, websocket)", r"streamlit|tornado|starlette|uvicorn|protobuf|asyncio"),
]


def summarise_profile(path: Path) -> dict:
    """Share of on-CPU samples by bucket, and the heaviest leaf functions, from py-spy's raw output."""
    if not path.exists():
        return {}
    buckets: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        for name, pattern in PROFILE_BUCKETS:
            if re.search(pattern, stack):
                buckets[name] += n
                break
        else:
            buckets["other"] += n
        leaves[re.sub(r" \(.*", "", stack.split(";")[-1])] += n
    if not total:
        return {}
    return {"samples": total,
            "share": {k: round(v / total, 3) for k, v in buckets.most_common()},
            "top_leaves": {k: round(v / total, 3) for k, v in leaves.most_common(12)}}


# --- the two parts ---------------------------------------------------------------------------------

def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    a = np.asarray(seconds)
    return {"p50_s": round(float(np.percentile(a, 50)), 2), "p95_s": round(float(np.percentile(a, 95)), 2),
            "max_s": round(float(a.max()), 2), "mean_s": round(float(a.mean()), 2)}


def _server(env: dict, log: Path):
    from tests.test_browser import streamlit_app

    return streamlit_app(env, log)


def part_load(data: Path, *, sessions: int, uploads: int, model: str | None, timeout_s: int, think_s: float,
              profile: Path | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mammo-load-"))
    try:
        env, model = server_env(tmp, model)
        files = dataset_uploads(data, tmp, sessions * uploads + 1)
        plan = [files[1 + s * uploads: 1 + (s + 1) * uploads] for s in range(sessions)]
        with _server(env, tmp / "streamlit.log") as url:
            pid = server_pid(int(url.rsplit(":", 1)[1]))
            with Sampler(pid) as sampler:
                asyncio.run(warm_up(url, files[0], timeout_s * 1000))
                time.sleep(2)
                before = sampler.now()
                t_start = time.monotonic()
                spy = start_profile(pid, profile, seconds=3600) if profile else None
                marks: dict = {}
                results, wall = asyncio.run(run_sessions(url, plan, timeout_ms=timeout_s * 1000, think_s=think_s,
                                                         on_uploaded=lambda: marks.update(rss=sampler.now())))
                if spy is not None:
                    spy.send_signal(2)  # SIGINT: py-spy writes what it has
                    spy.wait(timeout=60)
                time.sleep(5)
                after = sampler.now()
                peak = sampler.peak(t_start)
                load = sampler.load(t_start)
        ok = [r["seconds"] for r in results if r["outcome"] == "ok"]
        out = {"model": model, "sessions": sessions, "uploads_per_session": uploads, "think_s": think_s,
               "uploads": len(results), "scored": len(ok),
               "all_scored": len(ok) == sessions * uploads,
               "failures": collections.Counter(r["outcome"] for r in results if r["outcome"] != "ok"),
               **_percentiles(ok), "wall_s": round(wall, 1),
               "worklist_shown": _percentiles([r["listed_seconds"] for r in results if r["outcome"] == "ok"]),
               "by_upload_index": {k: _percentiles([r["seconds"] for r in results if r["k"] == k and r["outcome"] == "ok"])
                                   for k in range(1, uploads + 1)},
               "rss_mb": {"before": _mb(before), "peak": _mb(peak), "after_uploads": _mb(marks.get("rss", 0)),
                          "after_close_5s": _mb(after)},
               "load1_during": {k: round(v, 2) for k, v in load.items()}}
        if profile:
            out["profile"] = summarise_profile(profile)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def part_memory(data: Path, *, sessions: int, uploads: int, model: str | None, timeout_s: int, close_wait_s: int,
                width: int, height: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mammo-mem-"))
    try:
        env, model = server_env(tmp, model)
        base = breast_like_png(tmp / "base.png", width, height).read_bytes()
        plan = []
        for s in range(sessions):
            files = []
            for u in range(uploads):
                path = tmp / f"upload-s{s + 1}-u{u + 1}.png"
                path.write_bytes(png_variant(base, s * uploads + u))
                files.append(path)
            plan.append(files)
        small = dataset_uploads(data, tmp, 1, seed=1)[0]
        with _server(env, tmp / "streamlit.log") as url:
            pid = server_pid(int(url.rsplit(":", 1)[1]))
            with Sampler(pid, every=0.5) as sampler:
                asyncio.run(warm_up(url, small, timeout_s * 1000))
                time.sleep(3)
                idle = sampler.now()
                t_start = time.monotonic()
                marks: dict = {}
                closed_at: list[float] = []

                async def after_close() -> None:
                    closed_at.append(time.monotonic())

                results, wall = asyncio.run(run_sessions(
                    url, plan, timeout_ms=timeout_s * 1000, on_uploaded=lambda: marks.update(rss=sampler.now()),
                    on_closed=after_close))
                peak = sampler.peak(t_start)
                t_closed = closed_at[0]
                time.sleep(close_wait_s)
                after_wait = sampler.now()
                t_visit = time.monotonic()
                asyncio.run(visit_and_leave(url, timeout_s * 1000))
                time.sleep(30)
                after_visit = sampler.now()
                trace = [(round(t - t_closed, 1), _mb(r)) for t, r, _ in sampler.samples if t >= t_closed]
                load = sampler.load(t_start)
        within = idle + 300 * MB
        released = next((dt_ for dt_, r in trace if r * MB <= within), None)
        ok = [r["seconds"] for r in results if r["outcome"] == "ok"]
        every_10s = [trace[i] for i in range(0, len(trace), 20)]
        return {"model": model, "sessions": sessions, "uploads_per_session": uploads,
                "image": f"{width}x{height} 8-bit grayscale PNG, {len(base) / MB:.1f} MB",
                "uploads": len(results), "scored": len(ok), "all_scored": len(ok) == sessions * uploads,
                **_percentiles(ok), "wall_s": round(wall, 1),
                "rss_mb": {"idle": _mb(idle), "peak": _mb(peak), "after_uploads": _mb(marks.get("rss", 0)),
                           f"after_close_{close_wait_s}s": _mb(after_wait),
                           "after_a_later_visit_30s": _mb(after_visit)},
                "within_300mb_of_idle_at_close": bool(trace) and trace[0][1] * MB <= within,
                "released_within_300mb_of_idle_after_s": released,
                "later_visit_at_s": round(t_visit - t_closed, 1),
                "rss_after_close_mb_every_10s": every_10s,
                "load1_during": {k: round(v, 2) for k, v in load.items()}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def part_breakdown(data: Path, *, model: str | None, n: int = 10) -> dict:
    """Server-side cost of one Review upload, step by step, in this process (no browser, no Streamlit):
    median ms over `n` distinct dataset test images (after one warm-up), and the full garbage
    collection Streamlit runs after every script run, with and without the loaded objects frozen."""
    import gc

    from mammo_core.inference.explain import overlay
    from mammo_core.store.audit import open_audit_log
    from appkit.plots import fit_for_display, image_triplet_figure
    from mammo_core.inference.predict import Predictor
    import plotly.io

    tmp = Path(tempfile.mkdtemp(prefix="mammo-steps-"))
    try:
        files = dataset_uploads(data, tmp, n + 1, seed=2)
        predictor = Predictor.load(model)
        predictor.warm_up()
        log = open_audit_log(f"sqlite:///{tmp / 'audit.sqlite3'}")
        steps: dict[str, list[float]] = collections.defaultdict(list)
        for i, path in enumerate(files):
            raw = path.read_bytes()
            t = time.perf_counter()
            pred = predictor.prepare_one(raw, "upload.png")
            t1 = time.perf_counter()
            predictor.score_prepared([pred], with_cam=True)
            t2 = time.perf_counter()
            pixels = fit_for_display(pred.image.pixels)
            heat = pred.heatmap_on_original(pixels.shape)
            fig = image_triplet_figure(pixels, pred.model_input, overlay(pixels, heat, alpha=0.5, floor=0.5),
                                       outline=pred.outline_on(pixels.shape), height=420)
            t3 = time.perf_counter()
            payload = plotly.io.to_json(fig, validate=False)
            t4 = time.perf_counter()
            log.record(file_sha256=pred.sha256, file_name="upload.png", model_name=predictor.name,
                       model_sha256=predictor.model_sha256, probability=float(pred.probability), threshold=0.5,
                       decision="benign")
            log.recent(limit=50)
            log.to_csv()
            t5 = time.perf_counter()
            if i:  # the first is the warm-up
                for key, v in (("decode + preprocess", t1 - t), ("model + Grad-CAM", t2 - t1),
                               ("overlay + figure build", t3 - t2), ("figure to JSON", t4 - t3),
                               ("audit record + recent + CSV", t5 - t4)):
                    steps[key].append(v)
        out = {k: round(statistics.median(v) * 1e3, 1) for k, v in steps.items()}
        out["figure JSON size (kB)"] = round(len(payload) / 1024)
        gc.unfreeze()
        gcs = []
        for _ in range(3):
            t = time.perf_counter()
            gc.collect(2)
            gcs.append(time.perf_counter() - t)
        out["gc.collect(2) after a run, objects not frozen"] = round(statistics.median(gcs) * 1e3, 1)
        gc.freeze()
        t = time.perf_counter()
        gc.collect(2)
        out["gc.collect(2) after a run, loaded objects frozen"] = round((time.perf_counter() - t) * 1e3, 2)
        gc.unfreeze()
        return {"model": predictor.name, "median_ms": out, "images": n,
                "note": "dataset test images (224 x 224 PNG), one at a time, in this process"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- report --------------------------------------------------------------------------------------

def machine() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown CPU")
    return {"cpu": model, "cores": os.cpu_count(), "load1_at_start": os.getloadavg()[0],
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def _rows(summary: dict) -> list[tuple[str, str]]:
    rows = []
    if "load" in summary:
        a = summary["load"]
        shown = a.get("worklist_shown", {})
        rows += [(f"A. {a['sessions']} sessions x {a['uploads_per_session']} uploads: scored",
                  f"{a['scored']} of {a['sessions'] * a['uploads_per_session']}"),
                 ("A. upload to result drawn, p50 / p95 / max (s)", f"{a.get('p50_s')} / {a.get('p95_s')} / {a.get('max_s')}"),
                 ("A. upload to worklist shown (server answer), p50 / p95 (s)", f"{shown.get('p50_s')} / {shown.get('p95_s')}"),
                 ("A. server RSS before / peak / 5 s after close (MB)",
                  f"{a['rss_mb']['before']} / {a['rss_mb']['peak']} / {a['rss_mb']['after_close_5s']}"),
                 ("A. 1-min load average during (min-max)", f"{a['load1_during'].get('min')}-{a['load1_during'].get('max')}")]
    if "memory" in summary:
        m = summary["memory"]
        r = m["rss_mb"]
        wait = next(k for k in r if k.startswith("after_close_"))
        rows += [(f"B. {m['sessions']} sessions x {m['uploads_per_session']} uploads of {m['image']}: scored",
                  f"{m['scored']} of {m['sessions'] * m['uploads_per_session']}"),
                 ("B. server RSS idle / peak / after the uploads (MB)", f"{r['idle']} / {r['peak']} / {r['after_uploads']}"),
                 (f"B. server RSS {wait.replace('_', ' ')} (browsers closed) (MB)", f"{r[wait]}"),
                 ("B. server RSS 30 s after a later visit (MB)", f"{r['after_a_later_visit_30s']}"),
                 ("B. upload to result drawn, p50 / p95 (s)", f"{m.get('p50_s')} / {m.get('p95_s')}"),
                 ("B. 1-min load average during (min-max)", f"{m['load1_during'].get('min')}-{m['load1_during'].get('max')}")]
    if "breakdown" in summary:
        for k, v in summary["breakdown"]["median_ms"].items():
            rows.append((f"one upload, server side: {k}" + ("" if "kB" in k else " (ms)"), str(v)))
    return rows


def write_doc(summary: dict, command: str) -> None:
    """Append a results block (the command, the machine, a table, the full JSON on one line per part)."""
    text = DOC.read_text()
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\nResults of `python -m bench.app_load` (newest last).\n"
    m = summary["machine"]
    table = "\n".join(f"| {k} | {v} |" for k, v in _rows(summary))
    parts = "\n".join(f"{k}: {json.dumps(v, default=str)}" for k, v in summary.items() if k != "machine")
    block = (f"\n### Run of {m['date_utc']} UTC\n\n"
             f"{m['cores']} cores, {m['cpu']}; 1-minute load average {m['load1_at_start']:.2f} at start, "
             f"{m.get('load1_at_end', float('nan')):.2f} at end.\n\n```bash\n{command}\n```\n\n"
             f"| | |\n|---|---|\n{table}\n\n<details><summary>JSON</summary>\n\n```\n{parts}\n```\n\n</details>\n")
    DOC.write_text(text.rstrip("\n") + "\n" + block)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.app_load", description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["load", "memory", "both", "breakdown"], default="both",
                    help="breakdown: the server-side steps of one upload, timed in this process")
    ap.add_argument("--model", default=None, help="model name (default: the active model)")
    ap.add_argument("--sessions", type=int, default=10, help="A: concurrent browser sessions")
    ap.add_argument("--uploads", type=int, default=3, help="A: uploads per session")
    ap.add_argument("--think", type=float, default=0.0, help="A: seconds a session waits between its uploads")
    ap.add_argument("--mem-sessions", type=int, default=4, help="B: sessions")
    ap.add_argument("--mem-uploads", type=int, default=10, help="B: large uploads per session")
    ap.add_argument("--mem-size", default="8000x10000", help="B: image width x height")
    ap.add_argument("--close-wait", type=int, default=180, help="B: seconds RSS is sampled after the browsers close")
    ap.add_argument("--timeout", type=int, default=300, help="seconds one upload may take before it counts as failed")
    ap.add_argument("--profile", type=Path, default=None, help="A: py-spy raw profile of the server written here")
    ap.add_argument("--write", action="store_true", help="append the summary to docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    data = Path(os.environ.get("MAMMO_DATA_DIR", REPO.parent / "shared" / "data" / "augmented-inbreast"))
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} not found; install Debian's chromium")
    summary: dict = {"machine": machine()}
    if args.part == "breakdown":
        summary["breakdown"] = part_breakdown(data, model=args.model)
    if args.part in ("load", "both"):
        summary["load"] = part_load(data, sessions=args.sessions, uploads=args.uploads, model=args.model,
                                    timeout_s=args.timeout, think_s=args.think, profile=args.profile)
    if args.part in ("memory", "both"):
        w, h = (int(v) for v in args.mem_size.lower().split("x"))
        summary["memory"] = part_memory(data, sessions=args.mem_sessions, uploads=args.mem_uploads, model=args.model,
                                        timeout_s=args.timeout, close_wait_s=args.close_wait, width=w, height=h)
    summary["machine"]["load1_at_end"] = os.getloadavg()[0]
    print(json.dumps(summary, indent=1, default=str))
    if args.write:
        shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"]
        write_doc(summary, "MAMMO_DATA_DIR=../shared/data/augmented-inbreast python -m bench.app_load " + " ".join(shown))
    return summary


if __name__ == "__main__":
    main()
