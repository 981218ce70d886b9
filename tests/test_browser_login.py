"""Real-browser checks of a shared server: `streamlit run app.py` with a users file and MAMMO_NETWORK=1
on a loopback port; headless Chromium (Playwright) signs in through the real login form as a reader,
finds no Retrain link (and the page refuses a reader when its URL is opened directly), and uploads an image whose file name is Markdown: it must show masked, numbered and as plain text
(no link, no remote image), and the audit row must carry the user and a masked name. Skipped, with
the reason, when Chromium or Playwright is missing."""

from __future__ import annotations

import os
from pathlib import Path

import bcrypt
import pytest

from mammo_core.store.audit import AuditLog, mask_file_name

from .test_browser import CHROMIUM, streamlit_app

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)"),
]

MARKUP_NAME = "scan![t](https:evil.example)[Re-login](https:evil.example) :red[x] $x$ <b>bold.png"


@pytest.fixture
def shared_server(tiny_weights, tmp_path):
    users = tmp_path / "etc" / "users.toml"
    users.parent.mkdir()
    users.write_text('[users.rita]\nrole = "reader"\npassword_hash = "%s"\n'
                     % bcrypt.hashpw(b"reader-pass", bcrypt.gensalt(rounds=4)).decode())
    users.chmod(0o600)
    audit = tmp_path / "audit" / "audit.sqlite3"
    env = {**os.environ, "MAMMO_WEIGHTS_DIR": str(tiny_weights), "MAMMO_AUDIT_DB": str(audit),
           "MAMMO_AUTH_FILE": str(users), "MAMMO_NETWORK": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MAMMO_DATA_DIR", None)
    env.pop("MAMMO_AUDIT_KEEP_FILE_NAMES", None)
    with streamlit_app(env, tmp_path / "streamlit.log") as url:
        yield url, audit


def test_reader_signs_in_and_file_names_render_as_plain_text(shared_server, sample_png, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")
    url, audit = shared_server
    upload = tmp_path / "uploads" / MARKUP_NAME
    upload.parent.mkdir()
    upload.write_bytes(sample_png)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(120_000)
            remote = []
            page.on("request", lambda r: remote.append(r.url) if "evil.example" in r.url else None)
            page.goto(url)
            page.get_by_role("textbox", name="User name").fill("rita")
            page.get_by_role("textbox", name="Password").fill("wrong")
            page.get_by_role("button", name="Sign in").click()
            page.locator("[data-testid=stAlertContentError]", has_text="Wrong user name or password").wait_for()
            assert not page.locator("[data-testid=stSidebar] [data-testid=stPageLink]").count()
            page.get_by_role("textbox", name="Password").fill("reader-pass")
            page.get_by_role("button", name="Sign in").click()
            page.locator("[data-testid=stSidebar]", has_text="Signed in as rita").wait_for()
            page.locator("[data-testid=stSidebar] [data-testid=stPageLink]", has_text="Models").wait_for()
            nav = " ".join(page.locator("[data-testid=stSidebar] [data-testid=stPageLink]").all_inner_texts())
            assert "Review" in nav and "Metrics" in nav and "Models" in nav and "Retrain" not in nav
            page.goto(url + "/Retrain")  # a direct link (a new session: sign in again); the page refuses a reader
            page.get_by_role("textbox", name="User name").fill("rita")
            page.get_by_role("textbox", name="Password").fill("reader-pass")
            page.get_by_role("button", name="Sign in").click()
            page.locator("[data-testid=stAlertContentError]", has_text="for administrators").wait_for()
            assert not page.locator("[data-testid=stForm]").count()
            page.locator("[data-testid=stSidebar] [data-testid=stPageLink] a", has_text="Review").click()
            page.wait_for_selector("[data-testid=stFileUploaderDropzoneInput]", state="attached")
            page.set_input_files("[data-testid=stFileUploaderDropzoneInput]", [str(upload)])
            page.locator("[data-testid=stMetric]", has_text="Probability of malignancy").wait_for()
            heading = page.locator("[data-testid=stHeading]", has_text="scan").last
            assert heading.inner_text().strip() == "1 · " + mask_file_name(MARKUP_NAME)  # numbered, masked, literal
            main = page.locator("[data-testid=stMain]")
            assert not main.locator("a[href*='evil.example']").count()
            assert not main.locator("img[src*='evil.example']").count()
            assert not main.locator(".katex").count() and not main.locator("b", has_text="bold").count()
        finally:
            browser.close()
    assert not remote, remote  # nothing was fetched from the host named in the file name
    [row] = AuditLog(audit).recent()
    assert row["user"] == "rita"
    assert "evil" not in row["file_name"] and row["file_name"].endswith(".png")
