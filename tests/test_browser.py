"""Real-browser checks: `streamlit run app.py` on a loopback port, headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright for Python).

- Every page's URL opened directly, a page URL first on a fresh server (Streamlit's pages-directory
  convention must not fall back to a page without the shared setup): each renders fully, with the
  sidebar model selector, at 1280 px and 800 px wide; no text in the main tables or metrics is clipped;
  nothing is fetched from outside the machine (the page icon is shipped).
- Review: an upload shows the probability, the three panels and the error of an unreadable file.
- Models: making the leaky model active asks for a confirmation; then back to the first model.

Screenshots go to $MAMMO_ARTIFACTS_DIR (default: a pytest tmp folder): <page>-<width>.png, review.png,
models.png. Skipped, with the reason, when Chromium or Playwright is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from mammo_core.store import registry

CHROMIUM = os.environ.get("MAMMO_CHROMIUM", "/usr/bin/chromium")
WIDTHS = (1280, 800)
#: URL path of each page (Streamlit derives it from the file name in pages/) and a text it must show.
PAGES = {"Review": "Upload one or more images", "Metrics": "Honest numbers first", "Models": "Compare",
         "Retrain": "Start training", "": "Model in use"}

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


@contextlib.contextmanager
def streamlit_app(env: dict, log_path: Path):
    """`streamlit run app.py` with `env` on a free loopback port; yields its URL; stopped by process group."""
    port = _free_port()
    log = open(log_path, "wb")
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
def server(tiny_weights_copy, tmp_path):
    """A fresh `streamlit run app.py` on a free loopback port, on a private copy of the tiny models."""
    env = {**os.environ, "MAMMO_WEIGHTS_DIR": str(tiny_weights_copy), "MAMMO_AUDIT_DB": str(tmp_path / "audit.sqlite3"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    for name in ("MAMMO_DATA_DIR", "MAMMO_AUTH_FILE", "MAMMO_NETWORK"):
        env.pop(name, None)
    with streamlit_app(env, tmp_path / "streamlit.log") as url:
        yield url, tiny_weights_copy


@pytest.fixture
def artifacts_dir(tmp_path) -> Path:
    path = Path(os.environ.get("MAMMO_ARTIFACTS_DIR", tmp_path / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield chromium
        finally:
            chromium.close()


def _new_page(browser, width: int, outside: list[str]):
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.set_default_timeout(120_000)
    page.on("request", lambda r: outside.append(r.url)
            if not re.match(r"^(https?|wss?)://127\.0\.0\.1[:/]|^(data|blob):", r.url) else None)
    return page


# Elements of the main area whose text is cut (wider content than box, with hidden overflow or an ellipsis).
CLIPPED_JS = """
() => {
  const out = [];
  const main = document.querySelector('[data-testid=stMain]');
  const boxes = main.querySelectorAll('[data-testid=stTable] th, [data-testid=stTable] td, ' +
                                      '[data-testid=stMetricValue] div, [data-testid=stMetricLabel] p');
  for (const el of boxes) {
    if (el.scrollWidth > el.clientWidth + 1) out.push(el.innerText.slice(0, 60));
  }
  for (const t of main.querySelectorAll('[data-testid=stTable]')) {
    if (t.scrollWidth > t.clientWidth + 1) out.push('table wider than its box: ' + t.innerText.slice(0, 40));
  }
  return out;
}
"""


def _screenshot(page, path: Path) -> None:
    """The whole page at the window's size: Streamlit scrolls inside its main area, so the main area is
    scrolled a window at a time and the pieces are stacked (a window as tall as the page makes Chromium
    leave charts and tables undrawn)."""
    from PIL import Image

    main = "document.querySelector('[data-testid=stMain]')"
    total, view = page.evaluate(f"() => [{main}.scrollHeight, {main}.clientHeight]")
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    sheet = Image.new("RGB", (width, max(total, height) + (height - view)), "white")
    header = int(page.evaluate("() => document.querySelector('[data-testid=stHeader]')?.offsetHeight || 0"))
    y, pieces, previous = 0, path.with_suffix(".part.png"), None
    for _ in range(30):  # bounded: a page that stops scrolling must not hang the test
        top = page.evaluate(f"(y) => {{ {main}.scrollTo(0, y); return {main}.scrollTop; }}", y)
        time.sleep(0.8)  # charts in the newly shown part draw
        page.screenshot(path=str(pieces))
        shot = Image.open(pieces).convert("RGB")
        if top > 0:  # below the sticky header, which covers the top of every later piece
            shot = shot.crop((0, header, width, height))
        sheet.paste(shot, (0, int(top) + (header if top > 0 else 0)))
        bottom = int(top) + (header if top > 0 else 0) + shot.height
        if top + view >= total or y > 20_000 or top == previous:
            break
        previous = top
        y = top + view - header
    pieces.unlink()
    page.evaluate(f"() => {main}.scrollTo(0, 0)")
    sheet.crop((0, 0, width, bottom)).save(path)


def _wait_rendered(page, text: str) -> None:
    page.locator("[data-testid=stMain]", has_text=text).first.wait_for()
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')", timeout=120_000)
    time.sleep(0.5)


def test_every_page_url_opens_directly_at_both_widths(server, browser, artifacts_dir):
    url, _ = server
    outside: list[str] = []
    for width in WIDTHS:
        page = _new_page(browser, width, outside)
        for path, text in PAGES.items():  # /Review first: a fresh server's first visitor opens a deep link
            page.goto(f"{url}/{path}")
            _wait_rendered(page, text)
            if width <= 1000:
                page.wait_for_selector("[data-testid=stSidebar][data-collapsed=true]", state="attached")
            name = path or "Home"
            _screenshot(page, artifacts_dir / f"{name.lower()}-{width}.png")
            assert not page.locator("[data-testid=stException]").count(), f"{name} shows an exception"
            # the shared setup ran: the sidebar model selector, our navigation and the research-use note
            sidebar = page.locator("[data-testid=stSidebar]")
            assert sidebar.locator("[data-testid=stSelectbox]").count() == 1, name
            assert sidebar.locator("[data-testid=stPageLink]").count() == 5, name
            assert "Research use only" in sidebar.text_content(), name
            # narrow windows start with the sidebar collapsed, so the page gets the width
            assert sidebar.get_attribute("data-collapsed") == ("false" if width > 1000 else "true"), (name, width)
            assert not page.locator("[data-testid=stSidebarNav]").count(), "Streamlit's raw page list is shown"
            clipped = page.evaluate(CLIPPED_JS)
            assert not clipped, f"{name} at {width} px: clipped text {clipped}"
        page.close()
    assert not outside, f"requests left the machine: {outside[:5]}"


def test_review_upload_and_models_activation_in_a_real_browser(server, browser, sample_png, tmp_path, artifacts_dir):
    url, weights = server
    image = tmp_path / "IM00001"  # no extension, like a PACS export: the uploader takes it, the reader decides
    image.write_bytes(sample_png)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"this is not a DICOM file")
    outside: list[str] = []
    page = _new_page(browser, 1280, outside)
    page.goto(url + "/Review")
    page.wait_for_selector("[data-testid=stFileUploaderDropzoneInput]", state="attached")
    page.set_input_files("[data-testid=stFileUploaderDropzoneInput]", [str(image), str(broken)])
    label = page.locator("[data-testid=stMetric]", has_text="Probability of malignancy")
    value = label.locator("[data-testid=stMetricValue]").inner_text()
    page.locator("[data-testid=stAlertContentError]", has_text="broken.dcm").wait_for()
    # the panels come as plain images first (no charting library to load), each image decoded by the browser
    page.locator("[data-testid=stImage] img").nth(3).wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stImage] img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    captions = page.locator("[data-testid=stImageCaption]").all_inner_texts()
    assert captions[:3] == ["Original, breast outlined", "What the model saw", "Grad-CAM on the original"], captions
    assert not page.locator(".js-plotly-plot").count()
    _screenshot(page, artifacts_dir / "review_static.png")
    page.get_by_test_id("stCheckbox").get_by_text("Zoom and pan").click()  # the interactive figure on request
    page.locator(".js-plotly-plot").first.wait_for()
    time.sleep(1)  # let the figure finish drawing before the screenshot
    _screenshot(page, artifacts_dir / "review.png")
    assert not page.locator("[data-testid=stException]").count(), "the page shows an exception"
    titles = page.locator(".js-plotly-plot .annotation-text").evaluate_all("els => els.map(e => e.textContent)")
    assert {"Original, breast outlined", "What the model saw", "Grad-CAM on the original"} <= set(titles), titles
    assert page.locator(".js-plotly-plot .colorbar").count() == 1  # the Grad-CAM scale
    assert re.fullmatch(r"[01]\.\d{3}", value.strip()), value
    assert not page.evaluate(CLIPPED_JS)

    # the audit CSV is built when its button is clicked (not on every run), and what arrives is the log
    page.get_by_text("Audit log (recent entries)").click()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the full audit log (CSV)").click()
    csv_lines = Path(download.value.path()).read_text().splitlines()
    assert "file_sha256" in csv_lines[0] and len(csv_lines) == 2, csv_lines[:3]
    assert hashlib.sha256(sample_png).hexdigest() in csv_lines[1]

    # the uploader was emptied once the files were scored; another file joins the worklist
    assert not page.locator("[data-testid=stFileUploaderFile]").count()
    from tests.factories import png_bytes, synthetic_mammogram

    second = tmp_path / "second.png"
    second.write_bytes(png_bytes(synthetic_mammogram(11, malignant=False)))  # not sample_png (seed 7)
    page.set_input_files("[data-testid=stFileUploaderDropzoneInput]", [str(second)])
    page.locator("[data-testid=stHeading]", has_text="Worklist (2 scored").wait_for()
    assert not page.locator("[data-testid=stFileUploaderFile]").count()

    # Models: the leaky paper-split model needs a confirmation before it becomes the default; then back.
    page.goto(url + "/Models")
    _wait_rendered(page, "Compare")
    page.get_by_role("combobox", name="Model", exact=True).last.click()
    page.get_by_role("option", name="tiny-paper").click()
    page.locator("[data-testid=stAlertContentWarning]", has_text="memorised copies").wait_for()
    button = page.get_by_role("button", name="Make tiny-paper the active model")
    assert button.is_disabled()
    page.get_by_text("Make tiny-paper the default anyway").click()
    page.wait_for_function("() => [...document.querySelectorAll('button')].some("
                           "b => b.innerText.includes('Make tiny-paper the active model') && !b.disabled)")
    button.click()
    page.locator("[data-testid=stAlertContentSuccess]", has_text="tiny-paper is the active model").wait_for()
    assert registry.active_model_name(weights) == "tiny-paper"
    _screenshot(page, artifacts_dir / "models.png")
    page.get_by_role("combobox", name="Model", exact=True).last.click()
    page.get_by_role("option", name="tiny-grouped").click()
    page.get_by_role("button", name="Make tiny-grouped the active model").click()
    page.locator("[data-testid=stAlertContentSuccess]", has_text="tiny-grouped is the active model").wait_for()
    assert registry.active_model_name(weights) == "tiny-grouped"
    assert not outside, outside[:5]
